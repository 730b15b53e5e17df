"""GPU decode for the torch backend (``--decode gpu``): workers ship encoded bytes, the main process
decodes each batch with nvJPEG.

With ``decode="gpu"`` a worker only reads and batches: the JPEG bytes of each sample, its label and
id, and the augmentation parameters it drew (`pipeline.augment.params`). A sample that is not a
JPEG (PNG, WebP: nvJPEG cannot read them) is decoded by the worker on its CPU (OpenCV) and resized
to ``image_size`` there (`pipeline.augment.uint8_ops.resize_into`), then joins the batch as pixels.
What crosses the process boundary is one `EncodedBatch` of numpy arrays (~10 KB per 256 px face,
pickled with the message): the JPEG bytes end to end, their offsets, and the CPU-decoded images.

The main process (`decode_batch`) decodes all JPEGs of a batch in one
``torchvision.io.decode_jpeg(list, device=...)`` call (nvJPEG on CUDA), resizes them on the device
(antialiased bilinear, `pipeline.augment.batch_ops.resize_uint8`, one call per group of equal
sizes, so images of any size work), puts the CPU-decoded ones in their rows, and returns a uint8
NCHW batch on the device; the loader then augments it there (`apply_params`) and normalises.

``decode_device`` may be ``cpu``: the same assembly with torchvision's CPU decoder, which is how
the tests exercise it without a GPU. A JPEG the batched decode refuses is decoded alone (then by
OpenCV on the CPU); one no decoder reads is a `DataError` naming the sample.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.augment import uint8_ops
from pipeline.augment.batch_ops import resize_uint8
from pipeline.data.shards import DataError

JPEG_MAGIC = b"\xff\xd8\xff"


class EncodedBatch(NamedTuple):
    """One worker batch: row ``i`` is ``blob[offsets[i]:offsets[i + 1]]`` (JPEG bytes) when
    ``which[i] < 0``, else the CPU-decoded ``pixels[which[i]]`` (uint8 [S, S, 3])."""

    blob: np.ndarray
    offsets: np.ndarray
    which: np.ndarray
    pixels: np.ndarray


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_MAGIC


def encode_batch(payloads: Sequence, image_size: int) -> EncodedBatch:
    """``payloads``: per sample the JPEG ``bytes``, or a decoded uint8 HWC array (non-JPEG samples,
    resized here to ``image_size``)."""
    jpegs = [p if isinstance(p, (bytes, bytearray, memoryview)) else b"" for p in payloads]
    lengths = np.fromiter((len(j) for j in jpegs), dtype=np.int64, count=len(jpegs))
    offsets = np.zeros(len(jpegs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    others = [i for i, p in enumerate(payloads) if isinstance(p, np.ndarray)]
    which = np.full(len(payloads), -1, dtype=np.int64)
    which[others] = np.arange(len(others))
    pixels = np.empty((len(others), image_size, image_size, 3), dtype=np.uint8)
    if others:
        uint8_ops.resize_into([payloads[i] for i in others], pixels)
    blob = np.empty(int(offsets[-1]), dtype=np.uint8)
    for j, (a, b) in zip(jpegs, zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        if b > a:
            blob[a:b] = np.frombuffer(j, dtype=np.uint8)
    return EncodedBatch(blob, offsets, which, pixels)


def batch_rows(batch: EncodedBatch) -> List[torch.Tensor]:
    """Per row a CPU tensor (views, no copy): 1-D uint8 JPEG bytes, or uint8 [S, S, 3] pixels."""
    blob, pixels = torch.from_numpy(batch.blob), torch.from_numpy(batch.pixels)
    offsets, which = batch.offsets.tolist(), batch.which.tolist()
    return [blob[offsets[i]:offsets[i + 1]] if w < 0 else pixels[w] for i, w in enumerate(which)]


def decode_batch(rows: Sequence[torch.Tensor], ids: Sequence[str], image_size: int, device: torch.device,
                 hint: str) -> torch.Tensor:
    """uint8 [N, 3, S, S] on ``device`` from `batch_rows` rows: JPEGs decoded in one call on ``device``
    (nvJPEG on CUDA) and resized there; pixel rows copied into their places."""
    n, size = len(rows), image_size
    out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=device)
    jpeg = [i for i, r in enumerate(rows) if r.dim() == 1]
    if jpeg:
        decoded = _decode_jpegs([rows[i] for i in jpeg], [ids[i] for i in jpeg], device, hint)
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for j, image in enumerate(decoded):
            groups.setdefault(tuple(image.shape), []).append(j)
        for idx in groups.values():
            resized = resize_uint8(torch.stack([decoded[j] for j in idx]), size)
            out[torch.tensor([jpeg[j] for j in idx], device=device)] = resized
    others = [i for i, r in enumerate(rows) if r.dim() != 1]
    if others:
        pixels = torch.stack([rows[i] for i in others]).permute(0, 3, 1, 2)
        out[torch.tensor(others, device=device)] = pixels.to(device, non_blocking=True)
    return out


def _decode_jpegs(data: List[torch.Tensor], ids: List[str], device: torch.device, hint: str) -> List[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # find the one(s) the batched call refused; decode the rest alone
            return [_decode_one(d, key, device, hint) for d, key in zip(data, ids)]


def _decode_one(data: torch.Tensor, key: str, device: torch.device, hint: str) -> torch.Tensor:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exn:
        image = uint8_ops.decode(data.numpy().tobytes())
        if image is None:
            raise DataError(f"sample {key}.jpg: cannot decode it ({data.numel()} bytes; torchvision: "
                            f"{str(exn).strip().splitlines()[0]}; OpenCV refused it too); {hint}") from None
        return torch.from_numpy(image).permute(2, 0, 1).to(device)
