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

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from pipeline.augment.config import MEAN, STD, AugConfig

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
    rank: int, world_size: int, reader_seed: int, initial_fill: int,
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
    images = _resize(images, image_size)
    if not aug.is_identity:
        images = _augment(images, aug, image_size)
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW",
        mean=[255.0 * m for m in MEAN], std=[255.0 * s for s in STD],
    )
    return images, fn.pad(cls, fill_value=0), info


def build_pipeline(
    shards: List[str], indexes: List[str], *, device_id: Optional[int], train: bool, aug: AugConfig,
    image_size: int, batch_size: int, num_threads: int, rank: int, world_size: int, reader_seed: int,
    op_seed: int, initial_fill: int,
) -> Pipeline:
    """Build (not yet run) one DALI pipeline for this rank; ``device_id=None`` means CPU only.

    ``reader_seed`` seeds the reader's shuffle buffer, ``op_seed`` (the pipeline seed) every random
    op, so the same arguments give the same order and augmentation.
    """
    pipe = _graph(
        shards, indexes, gpu=device_id is not None, train=train, aug=aug, image_size=image_size,
        rank=rank, world_size=world_size, reader_seed=reader_seed, initial_fill=initial_fill,
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=op_seed,
    )
    pipe.build()
    return pipe
