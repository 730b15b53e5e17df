"""Per-sample uint8 processing of decoded images with OpenCV, for the torch backend's workers.

`pipeline.augment.params` augments a whole batch on the device, in float. That is the right place on a GPU;
on a CPU the same cores do the work wherever it runs, and float work on a 224 px batch costs about
as much as decoding it (``grid_sample`` of the batch, ``uint8 -> float``, normalising). So on the CPU
the torch backend's workers finish each image here, in uint8 and with one resampling per image:

* decode (`decode`, libjpeg-turbo via OpenCV, RGB, EXIF orientation ignored as torchvision and DALI do);
* the eval resize to ``image_size`` (`resize_into`: bilinear with antialias, bit-identical to
  `pipeline.augment.batch_ops.resize_uint8`);
* a sample the geometric block applies to: one ``cv2.warpAffine`` (bilinear, zero fill) of flips,
  rotation, shear and zoom composed into one matrix, the map `pipeline.augment.batch_ops.warp` applies;
  then brightness (rounded to uint8);
* then Gaussian blur and JPEG re-compression, per sample, as in `pipeline.augment.params`.

Resize first, then warp (as torchvision's ``Resize`` then ``RandomAffine``), in every backend: a
warp straight from a large decoded image to a small output would alias (bilinear sampling has no
antialias), and the augmented half of the samples would then differ from the other half in more
than the augmentation.

The parameters are the same `pipeline.augment.params.AugParams` the batch version uses, drawn by the same
`draw_params`. The float output is `normalize_into` (or `normalize_hwc`): one table lookup per
byte (``cv2.LUT``, uint8 -> float32 normalised) instead of a float conversion plus two passes,
which the torch backend's workers write straight into a shared-memory batch (`pipeline.data.handoff`).
"""
from __future__ import annotations

import ctypes
import functools
import math
import weakref
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.augment.config import DEFAULT_NORM, Norm
from pipeline.augment.crop import crops_into
from pipeline.augment.params import AugParams, inverse_affine

# Ignore EXIF orientation, as torchvision's decode_image and DALI's decoders do (the packer stores
# rotated inputs upright); always 3-channel RGB (grey replicated, alpha dropped).
_DECODE_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION

_WARP_FLAGS = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP


def single_threaded() -> None:
    """Make OpenCV run each call on the calling thread, in this process (and in processes it forks).

    Call it in the main process before DataLoader workers fork: a fork while OpenCV's thread pool is
    up leaves each child a pool whose threads do not exist, and the child's first parallel OpenCV
    call (or ``cv2.setNumThreads``) then waits for them forever. Each worker has a core to itself
    anyway, and the main process's one OpenCV call per batch (`normalize_hwc`) is short.
    """
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


def steady_heap() -> bool:
    """Make glibc keep the memory of freed per-batch buffers for the next batch (this process).

    A batch allocates and frees the same large blocks each time (64 decoded 196 KB images, the
    12.5 MB stack that is resized). With glibc's defaults the top of the heap is returned to the
    kernel as soon as 2x the (adaptive) mmap threshold is free there and taken back for the next
    batch: page faults and ``brk`` calls measured at ~20% of a loader worker's time (perf), ~0.1 ms
    per image. Fixed thresholds (mmap above 32 MB, trim above 256 MB) keep it; the heap then stays
    at its high-water mark, a few batches' worth. False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 256 << 20))


def decode(data: bytes) -> Optional[np.ndarray]:
    """Encoded JPEG/PNG/WebP bytes -> uint8 HWC RGB array, or None when OpenCV cannot decode them."""
    return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _DECODE_FLAGS)


def resize_into(images: List[np.ndarray], out: np.ndarray) -> None:
    """Resize each uint8 HWC image of ``images`` into ``out[i]`` ([N, S, S, 3] uint8): bilinear with
    antialias, bit-identical to `pipeline.augment.batch_ops.resize_uint8` (torchvision ``resize``).

    torch's uint8 antialiased kernel on channels-last views, one call per group of equal-sized
    images: the kernel computes its filter weights once per call, which costs more than the
    filtering itself for a single 256 px image (0.28 ms per image one by one, 0.11 batched).
    """
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    target = torch.from_numpy(out)
    for shape, idx in groups.items():
        if shape == out.shape[1:]:
            for i in idx:
                out[i] = images[i]
            continue
        src = torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2)  # channels-last view
        if len(idx) == out.shape[0] and _resize_out(src, target.permute(0, 3, 1, 2)):
            continue
        resized = F.interpolate(src, size=out.shape[1:3], mode="bilinear", antialias=True, align_corners=False)
        for j, i in enumerate(idx):
            target[i].copy_(resized[j].permute(1, 2, 0))


def _resize_out(src: torch.Tensor, dst: torch.Tensor) -> bool:
    """``F.interpolate(src, antialias=True)`` written straight into ``dst`` (the shared-memory batch):
    no 10 MB temporary to page in and copy. False where this torch lacks the ``out=`` overload."""
    try:
        torch.ops.aten._upsample_bilinear2d_aa.out(src, list(dst.shape[2:]), False, None, None, out=dst)
    except (AttributeError, RuntimeError, TypeError):
        return False
    return True


def warp_matrices(inv: np.ndarray, image_size: int) -> np.ndarray:
    """[N, 2, 3] output->input pixel maps for ``cv2.warpAffine(..., WARP_INVERSE_MAP)`` at ``image_size``.

    ``inv`` is [N, 2, 2] (`pipeline.augment.params.inverse_affine`): input = ``c + inv @ (p - c)`` in pixel
    coordinates about the centre ``c`` (pixel centres at +0.5, as ``grid_sample`` with
    ``align_corners=False``; OpenCV's pixel centres are the integers, hence ``c = size / 2 - 0.5``).
    """
    c = np.full(2, image_size / 2.0 - 0.5)
    return np.concatenate([inv, (c - inv @ c)[:, :, None]], axis=2)


def gaussian_blur_(image: np.ndarray, sigma: float) -> None:
    """Blur uint8 HWC ``image`` in place: 3-sigma window, reflect borders (as `pipeline.augment.params`)."""
    h, w = image.shape[:2]
    radius = max(1, min(int(math.ceil(3.0 * sigma)), h - 1, w - 1))
    cv2.GaussianBlur(image, (2 * radius + 1, 2 * radius + 1), max(float(sigma), 1e-3), dst=image,
                     borderType=cv2.BORDER_REFLECT_101)


def jpeg_roundtrip_(image: np.ndarray, quality: int) -> None:
    """Re-compress uint8 HWC RGB ``image`` in place as a JPEG of ``quality`` (libjpeg, 4:2:0)."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # cannot happen for a uint8 HWC image; do not hand back a half-written one
        raise RuntimeError(f"OpenCV could not JPEG-encode a {image.shape} image at quality {quality}")
    image[...] = cv2.imdecode(encoded, cv2.IMREAD_COLOR_RGB)


def process_into(images: list, out: np.ndarray, params: Optional[AugParams], *, crop: bool = False,
                 finish: bool = True) -> None:
    """Write each decoded uint8 HWC image of ``images``, augmented with ``params``, into ``out[i]``.

    ``out`` is [N, S, S, 3] uint8. First the image is brought to size: resized, or with ``crop`` cropped
    at native resolution (`pipeline.augment.crop`, which also applies the drawn down-scaling). Then,
    with ``finish``, the rest of ``params`` (warp, brightness, blur, JPEG); without it the caller
    applies them (the GPU path). ``params`` None means the eval preprocessing only.
    """
    size = out.shape[1]
    if crop:
        crops_into(images, out, params)
    else:
        resize_into(images, out)
    if params is None or not finish:
        return
    apply = params.apply.tolist()
    inv = inverse_affine(params.angle, params.shear_x, params.shear_y, params.scale,
                         params.hflip, params.vflip).numpy()
    identity = np.abs(inv - np.eye(2)).max(axis=(1, 2)) <= 1e-12
    warped = [a and not same for a, same in zip(apply, identity.tolist())]
    flips = [_flip_code(m) for m in inv]
    matrices = warp_matrices(inv, size)
    brightness = params.brightness.tolist()
    blur, sigma = params.blur.tolist(), params.sigma.tolist()
    jpeg, quality = params.jpeg.tolist(), params.quality.tolist()
    for i, slot in enumerate(out):
        if warped[i] and flips[i] is not None:  # a pure flip moves pixels exactly: no resampling
            cv2.flip(slot, flips[i], dst=slot)
        elif warped[i]:
            # OpenCV's bilinear warp has a SIMD path for 4 channels only: padding to RGBA and back
            # gives the same bytes in half the time (0.12 ms instead of 0.24 at 224 px).
            rgba = cv2.warpAffine(cv2.cvtColor(slot, cv2.COLOR_RGB2RGBA), matrices[i], (size, size),
                                  flags=_WARP_FLAGS, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
            cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB, dst=slot)
        if apply[i] and brightness[i] != 1.0:  # saturate(round(v * factor)), like the float path's clamp
            cv2.convertScaleAbs(slot, dst=slot, alpha=brightness[i])
        if blur[i]:
            gaussian_blur_(slot, sigma[i])
        if jpeg[i]:
            jpeg_roundtrip_(slot, quality[i])


def _flip_code(inv: np.ndarray) -> Optional[int]:
    """cv2.flip's code when the 2x2 map ``inv`` is a flip (1 horizontal, 0 vertical, -1 both), else None."""
    for code, m in ((1, (-1.0, 1.0)), (0, (1.0, -1.0)), (-1, (-1.0, -1.0))):
        if np.abs(inv - np.diag(m)).max() <= 1e-12:
            return code
    return None


@functools.lru_cache(maxsize=8)
def normalize_table(norm: Norm = DEFAULT_NORM) -> np.ndarray:
    """The ``cv2.LUT`` table of `normalize_into` for ``norm``: ``(v / 255 - mean) / std`` of every byte
    value per channel, in float64 rounded once to float32."""
    table = (np.arange(256, dtype=np.float64)[:, None] / 255.0 - np.array(norm[0])) / np.array(norm[1])
    return table.astype(np.float32).reshape(256, 1, 3)


class BufferPool:
    """Float output batches that are reused once nothing references them any more.

    A fresh 38 MB batch (64 x 224 x 224 x 3 float32) costs the kernel ~9,000 page faults and a
    zero-fill: 0.15 ms per image, twice the normalising itself. The pool hands out tensors over
    numpy blocks it keeps; ``torch.from_numpy`` holds the only strong reference to the array, so a
    block is free again exactly when the batch and every view of it (autograd's saved input
    included) are gone. At most ``capacity`` blocks are kept; memory does not grow with the data.
    """

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self.blocks: List[list] = []  # [block: uint8 ndarray, weakref to the array lent out, or None]

    def empty(self, shape: Tuple[int, ...]) -> torch.Tensor:
        """An uninitialised float32 CPU tensor of ``shape``."""
        nbytes = math.prod(shape) * 4
        for entry in self.blocks:
            block, lent = entry
            if block.nbytes >= nbytes and (lent is None or lent() is None):
                return self._lend(entry, nbytes, shape)
        if len(self.blocks) < self.capacity:
            entry = [np.empty(nbytes, dtype=np.uint8), None]
            self.blocks.append(entry)
            return self._lend(entry, nbytes, shape)
        return torch.empty(shape, dtype=torch.float32)

    @staticmethod
    def _lend(entry: list, nbytes: int, shape: Tuple[int, ...]) -> torch.Tensor:
        array = entry[0][:nbytes].view(np.float32).reshape(shape)
        entry[1] = weakref.ref(array)
        return torch.from_numpy(array)


def normalize_hwc(batch: torch.Tensor, pool: Optional[BufferPool] = None) -> torch.Tensor:
    """uint8 [N, H, W, 3] CPU batch -> float32 normalised [N, 3, H, W] (channels-last memory).

    One ``cv2.LUT`` pass with a per-channel float table: the value of ``(v / 255 - MEAN) / STD``
    for every byte, in float64 rounded once. About 3x faster than ``.float()`` and two in-place ops.
    ``pool``: take the output memory from a `BufferPool`.
    """
    if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[-1] != 3 or batch.device.type != "cpu":
        raise ValueError(f"expected a uint8 N x H x W x 3 CPU batch, got {batch.dtype} {tuple(batch.shape)} "
                         f"on {batch.device}")
    n, h, w, _ = batch.shape
    out = pool.empty((n, h, w, 3)) if pool is not None else torch.empty((n, h, w, 3), dtype=torch.float32)
    normalize_into(batch.contiguous().numpy(), out.numpy())
    return out.permute(0, 3, 1, 2)


def normalize_into(images: np.ndarray, out: np.ndarray, table: Optional[np.ndarray] = None) -> None:
    """uint8 [N, H, W, 3] ``images`` -> normalised float32 written into ``out`` (same shape, C-contiguous,
    e.g. a shared-memory batch): the `normalize_hwc` table lookup without an allocation. ``table``:
    `normalize_table` of the loader's normalisation (default: `DEFAULT_NORM`'s)."""
    if images.dtype != np.uint8 or out.dtype != np.float32 or images.shape != out.shape or images.ndim != 4 \
            or images.shape[-1] != 3 or not out.flags.c_contiguous:
        raise ValueError(f"expected uint8 N x H x W x 3 images and a C-contiguous float32 output of the same shape, "
                         f"got {images.dtype} {images.shape} -> {out.dtype} {out.shape}")
    n, h, w, _ = images.shape
    if n:
        src = np.ascontiguousarray(images).reshape(n * h, w, 3)
        cv2.LUT(src, normalize_table() if table is None else table, dst=out.reshape(n * h, w, 3))
