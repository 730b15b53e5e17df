"""`build_loader`: the one entry point from shards to device batches, for train, evaluate and bench.

Two interchangeable backends with the same contract:

* ``dali``  - `pipeline.loader_dali`: DALI webdataset reader, nvJPEG decode and GPU ops on CUDA,
  the CPU pipeline (``device_id=None``) without it.
* ``torch`` - `pipeline.loader_torch`: shard stream, uint8 decode + resize in DataLoader workers;
  per-sample augmentation on the batch on the GPU (`pipeline.torch_aug`), or, on a CPU, in the
  workers in uint8 (`pipeline.cpu_aug`). The faster backend on CPU.

Contract of the returned loader (both backends):

* iterating yields ``Batch(images, labels, ids)``: images float32 NCHW ``image_size`` square,
  normalised with `pipeline.augment.MEAN`/``STD``, on ``device`` (the torch backend on CPU gives
  them channels-last memory: use ``reshape``, not ``view``, to flatten one); labels float32 ``[N]`` on
  ``device`` (1 = fake, 0 = real); ids the ``__key__`` of each sample (list of str).
* ``len(loader)`` is the number of batches per epoch, the same on every rank.
* ``loader.set_epoch(e)`` makes the next pass deterministic from ``(seed, e)``: the same seed and
  epoch give the same order and augmentation; another epoch gives another order.
* ``train=True``: each rank sees a disjoint part of the split, no id twice within an epoch on a
  rank, the last partial batch dropped, equal steps per rank.
* ``train=False``: across all ranks every id of the split appears at least once per epoch; to keep
  steps equal a rank may repeat ids of its own part as padding. Consumers drop repeats by id
  (`drop_repeats`).
* ``loader.num_samples``: samples this rank contributes per epoch (before padding, after drop).
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import List, NamedTuple, Sequence, Tuple, Union

import torch

from pipeline.augment import AugConfig

BACKENDS = ("dali", "torch")
BACKEND_CHOICES = ("auto",) + BACKENDS


def resolve_backend(backend: str, device: Union[str, torch.device]) -> str:
    """``auto`` -> ``dali`` on a CUDA device when DALI is installed (nvJPEG decode + GPU ops), else
    ``torch`` (on a CPU its workers finish each image in uint8: the faster loader there); any other
    value is returned as it is."""
    if backend != "auto":
        return backend
    if torch.device(device).type == "cuda" and importlib.util.find_spec("nvidia.dali") is not None:
        return "dali"
    return "torch"


class Batch(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    ids: List[str]


def build_loader(
    data: Union[str, Path],
    split: str,
    *,
    backend: str = "auto",
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 64,
    image_size: int = 224,
    train: bool,
    aug: Union[AugConfig, str, None] = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 2,
):
    """Build a loader over ``split`` of ``data`` (a pack output folder or a shard pattern).

    ``backend``: ``dali``, ``torch`` or ``auto`` (`resolve_backend`). ``aug`` is an `AugConfig`, a
    preset name, or None (``none`` for eval, ``seed`` for train).
    Raises ValueError for bad arguments and `pipeline.data.DataError` for bad data, both naming
    the flag or file.
    """
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"--backend {backend!r}: choose one of {', '.join(BACKEND_CHOICES)}")
    backend = resolve_backend(backend, device)
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be >= 1")
    if image_size < 8:
        raise ValueError(f"--image-size {image_size}: must be >= 8")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if num_workers < 0:
        raise ValueError(f"--workers {num_workers}: must be >= 0")
    if aug is None:
        aug = AugConfig.preset("seed" if train else "none")
    elif isinstance(aug, str):
        aug = AugConfig.preset(aug)
    device = torch.device(device)
    kwargs = dict(
        device=device, batch_size=batch_size, image_size=image_size, train=train, aug=aug,
        rank=rank, world_size=world_size, seed=seed, num_workers=num_workers,
    )
    if backend == "dali":
        from pipeline.loader_dali import DaliLoader

        return DaliLoader(data, split, **kwargs)
    from pipeline.loader_torch import TorchLoader

    return TorchLoader(data, split, **kwargs)


def rank_share(total: int, rank: int, world_size: int) -> int:
    """Samples of a ``total``-sample split that rank ``rank`` reads: contiguous ranges whose sizes
    differ by at most one (DALI's sharding, and the torch backend's split by sample)."""
    return total * (rank + 1) // world_size - total * rank // world_size


def steps_per_epoch(total: int, world_size: int, batch_size: int, *, train: bool) -> int:
    """Batches per epoch, the same on every rank.

    Train: the full batches of the smallest rank's share (the rest is dropped). Eval: enough batches
    for the largest share, smaller ranks padding with repeats.
    """
    if train:
        return (total // world_size) // batch_size
    return math.ceil(math.ceil(total / world_size) / batch_size)


def drop_repeats(ids: Sequence[str], *columns: Sequence) -> Tuple[List[str], ...]:
    """Keep the first occurrence of each id (eval padding), and the same rows of each column."""
    seen = set()
    keep = []
    for i, key in enumerate(ids):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return ([ids[i] for i in keep],) + tuple([col[i] for i in keep] for col in columns)
