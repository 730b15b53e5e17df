"""The DALI graph of `pipeline.data.dali_backend`: webdataset reader -> decode -> augment -> normalise.

Imports ``nvidia.dali`` at module level: import this module only where DALI is wanted
(`pipeline.data.dali_backend` does so lazily, so the rest of the package works without DALI).

Augmentation follows `pipeline.augment.config.AugConfig` with `pipeline.augment.params`'s conventions
(torchvision ``RandomAffine``), every parameter drawn per sample inside the graph. One coin per
sample (``apply_prob``) picks the samples that are augmented. Every sample gets the eval resize to
``image_size`` (bilinear, antialias); for the augmented ones, flips, zoom, shear and rotation then
make one affine matrix, applied by a single ``warp_affine`` at ``image_size`` (resize, then warp, as
`pipeline.augment.uint8_ops` explains), then a brightness factor. Gaussian blur and JPEG re-compression then run
on the samples their own coins select. The per-sample branches are DALI conditionals: each op runs
only on its samples.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from nvidia.dali import fn, math, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from pipeline.augment.config import AugConfig, Norm

READER_NAME = "Reader"

OUTPUTS = ("images", "labels", "info")

IMAGE_EXT = "jpg;png;webp"


def _uniform(rng: Sequence[float]):
    """A per-sample float drawn from ``[low, high]``; ``low == high`` is allowed (DALI's range is not)."""
    low, high = float(rng[0]), float(rng[1])
    return low + (high - low) * fn.random.uniform(range=[0.0, 1.0])


def _zero():
    return _uniform((0.0, 0.0))


def _affine(aug: AugConfig, size: int):
    """Per-sample forward (input -> output pixel) matrix of a ``size`` square: centre, flip+zoom,
    shear, rotate."""
    sx = sy = 1.0
    if aug.hflip > 0:
        sx = sx * (1.0 - 2.0 * fn.random.coin_flip(probability=aug.hflip))
    if aug.vflip > 0:
        sy = sy * (1.0 - 2.0 * fn.random.coin_flip(probability=aug.vflip))
    if aug.scale != (1.0, 1.0):
        zoom = _uniform(aug.scale)
        sx, sy = sx * zoom, sy * zoom
    mt = fn.transforms.translation(offset=[size * -0.5, size * -0.5])
    mt = fn.transforms.scale(mt, scale=fn.stack(sx, sy))
    # torchvision RandomAffine conventions (as pipeline.augment.params): shear x, then shear y, then
    # rotate, with SHx(a) = [[1, -tan a], [0, 1]] and SHy(a) = [[1, 0], [-tan a, 1]]; DALI's shear
    # matrix has +tan, hence the negated angles.
    if aug.shear_x != (0.0, 0.0):
        mt = fn.transforms.shear(mt, angles=fn.stack(-1.0 * _uniform(aug.shear_x), _zero()))
    if aug.shear_y != (0.0, 0.0):
        mt = fn.transforms.shear(mt, angles=fn.stack(_zero(), -1.0 * _uniform(aug.shear_y)))
    if aug.rotate > 0:
        mt = fn.transforms.rotation(mt, angle=_uniform((-aug.rotate, aug.rotate)))
    return fn.transforms.translation(mt, offset=[size * 0.5, size * 0.5])


def _resize(images, size: int):
    """The eval resize: bilinear with antialias, aspect ratio not kept (`pipeline.augment.batch_ops.resize_uint8`)."""
    return fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)


# The interpolations of the random down-scaling, drawn per sample (`pipeline.augment.crop`'s list
# has OpenCV's area, linear, cubic and Lanczos: DALI's resize antialiases every filter on down-scaling).
DOWNSCALE_INTERPS = (types.INTERP_TRIANGULAR, types.INTERP_LINEAR, types.INTERP_CUBIC, types.INTERP_LANCZOS3)


def _even_offset(free, fraction=None):
    """`pipeline.augment.params.crop_offset` on per-sample nodes: an even offset in ``[0, free]`` at
    ``fraction`` of the range (the centre without one); ``free`` <= 0 gives 0."""
    slots = math.floor(math.max(free, 0.0) * 0.5) + 1.0
    pick = math.floor(slots * 0.5) if fraction is None else math.min(slots - 1.0, math.floor(fraction * slots))
    return 2.0 * pick


def _crop(images, encoded, aug: AugConfig, size: int, train: bool):
    """``preprocess='crop'``: a ``size`` square at native resolution (`pipeline.augment.crop`).

    Training first down-scales the samples its coin picks (factor and interpolation drawn per
    sample), then crops at even offsets drawn per sample; evaluation takes the centre crop at an
    even offset. An image smaller than the crop is padded by reflection (edge pixel included, as
    the torch backend's ``BORDER_REFLECT``): one mirrored copy on every side, built only for those
    samples (a 3x3 mosaic of flips); a pad wider than the image itself is filled with zeros here
    (the torch backend reflects again). Crops copy pixels: no resampling unless down-scaled.
    """
    shape = fn.cast(fn.peek_image_shape(encoded), dtype=types.FLOAT)
    h, w = shape[0], shape[1]
    if train and aug.downscale_prob > 0:
        if fn.random.coin_flip(probability=aug.downscale_prob, dtype=types.BOOL):
            factor = _uniform(aug.downscale)
            h, w = math.max(math.floor(h * factor + 0.5), 1.0), math.max(math.floor(w * factor + 0.5), 1.0)
            interp = fn.cast(fn.random.uniform(values=[int(i) for i in DOWNSCALE_INTERPS], dtype=types.INT32),
                             dtype=types.INTERP_TYPE)
            images = fn.resize(images, resize_x=w, resize_y=h, interp_type=interp, antialias=True)
    s = float(size)
    # the padding before the image: even (the pixel grid keeps its parity), as pipeline.augment.crop.pad_to
    top = 2.0 * math.floor(math.max(s - h, 0.0) * 0.25 + 0.75)
    left = 2.0 * math.floor(math.max(s - w, 0.0) * 0.25 + 0.75)
    fy = fn.random.uniform(range=[0.0, 1.0]) if train else None
    fx = fn.random.uniform(range=[0.0, 1.0]) if train else None
    y, x = _even_offset(h - s, fy) - top, _even_offset(w - s, fx) - left
    if math.min(h, w) < s:
        fh, fv, fhv = (fn.flip(images, horizontal=a, vertical=b) for a, b in ((1, 0), (0, 1), (1, 1)))
        edge = fn.cat(fhv, fv, fhv, axis_name="W")  # the rows above and below: mirrored vertically
        images = fn.cat(edge, fn.cat(fh, images, fh, axis_name="W"), edge, axis_name="H")
        y, x = y + h, x + w
    return fn.slice(images, start=fn.cast(fn.stack(y, x), dtype=types.INT32), shape=[size, size], axis_names="HW",
                    out_of_bounds_policy="pad", fill_values=0)


def _augment(images, aug: AugConfig, size: int):
    """Per-sample augmentation of images already resized to ``size``.

    DALI conditionals split the batch by a per-sample predicate, so each branch runs only on its
    samples (the warp costs several times the resize on CPU).
    """
    apply = fn.random.coin_flip(probability=aug.apply_prob, dtype=types.BOOL)
    if aug.geometric:
        if apply:
            images = fn.warp_affine(
                images, matrix=_affine(aug, size), size=[size, size], inverse_map=False,
                fill_value=0, interp_type=types.INTERP_LINEAR,
            )
    if aug.brightness != (1.0, 1.0) and aug.apply_prob > 0:
        if apply:
            images = fn.brightness(images, brightness=_uniform(aug.brightness))
    if aug.blur_prob > 0:
        if fn.random.coin_flip(probability=aug.blur_prob, dtype=types.BOOL):
            images = fn.gaussian_blur(images, sigma=_uniform(aug.blur_sigma))
    if aug.jpeg_prob > 0:
        lo, hi = aug.jpeg_quality
        if fn.random.coin_flip(probability=aug.jpeg_prob, dtype=types.BOOL):
            quality = fn.random.uniform(values=list(range(lo, hi + 1)), dtype=types.INT32)
            images = fn.jpeg_compression_distortion(images, quality=quality)
    return images


@pipeline_def(enable_conditionals=True)
def _graph(
    shards: List[str], indexes: List[str], *, gpu: bool, train: bool, aug: AugConfig, image_size: int,
    norm: Norm, rank: int, world_size: int, reader_seed: int, initial_fill: int,
):
    encoded, cls = fn.readers.webdataset(
        paths=shards, index_paths=indexes, ext=[IMAGE_EXT, "cls"], missing_component_behavior="error",
        shard_id=rank, num_shards=world_size, random_shuffle=train, initial_fill=initial_fill,
        seed=reader_seed, pad_last_batch=not train, name=READER_NAME,
        # plain reads: with mmap a tar truncated after indexing crashes the process (SIGBUS)
        # instead of raising an error naming the file
        dont_use_mmap=True,
    )
    # "shard.tar:offset:key.ext" as bytes, zero-padded to the longest in the batch (uniform shape)
    info = fn.pad(fn.get_property(encoded, key="source_info"), fill_value=0)
    images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
    if aug.preprocess == "crop":
        images = _crop(images, encoded, aug, image_size, train)
    else:
        images = _resize(images, image_size)
    if not aug.is_identity:
        images = _augment(images, aug, image_size)
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW",
        mean=[255.0 * m for m in norm[0]], std=[255.0 * s for s in norm[1]],
    )
    return images, fn.pad(cls, fill_value=0), info


def build_pipeline(
    shards: List[str], indexes: List[str], *, device_id: Optional[int], train: bool, aug: AugConfig,
    image_size: int, batch_size: int, num_threads: int, norm: Norm, rank: int, world_size: int, reader_seed: int,
    op_seed: int, initial_fill: int,
) -> Pipeline:
    """Build (not yet run) one DALI pipeline for this rank; ``device_id=None`` means CPU only.

    ``reader_seed`` seeds the reader's shuffle buffer, ``op_seed`` (the pipeline seed) every random
    op, so the same arguments give the same order and augmentation.
    """
    pipe = _graph(
        shards, indexes, gpu=device_id is not None, train=train, aug=aug, image_size=image_size, norm=norm,
        rank=rank, world_size=world_size, reader_seed=reader_seed, initial_fill=initial_fill,
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=op_seed,
    )
    pipe.build()
    return pipe
