"""The loader contract both backends keep: the spec they are built from, the batches they yield.

`LoaderSpec` is every setting of a loader in one frozen object, validated once on construction
(errors name the flag); `pipeline.data.loader.build_loader(spec)` picks the backend and resolves
the shards once. Contract of the returned loader (both backends):

* iterating yields ``Batch(images, labels, ids)``: images float32 NCHW ``image_size`` square,
  normalised with ``spec.norm`` (``(x / 255 - mean) / std``; default ImageNet's), on ``device`` (the torch backend on CPU
  gives them channels-last memory: use ``reshape``, not ``view``, to flatten one); labels float32
  ``[N]`` on ``device`` (1 = fake, 0 = real); ids the ``__key__`` of each sample (list of str).
* ``len(loader)`` is the number of batches per epoch, the same on every rank.
* ``loader.set_epoch(e)`` makes the next pass deterministic from ``(seed, e)``: the same seed and
  epoch give the same order and augmentation; another epoch gives another order.
* ``train=True``: each rank sees a disjoint part of the split, no id twice within an epoch on a
  rank, the last partial batch dropped, equal steps per rank. Several sources (``data`` a tuple, torch
  backend): each source's share of the epoch follows ``weights`` (`pipeline.data.mixture`); a source
  read more than once per epoch repeats ids.
* ``train=False``: across all ranks every id of the split appears at least once per epoch; to keep
  steps equal a rank may repeat ids of its own part as padding. Consumers drop repeats by id
  (`drop_repeats`).
* ``loader.spec`` (with the backend that runs, never ``auto``), ``loader.split_samples`` (samples
  in the whole split) and ``loader.num_samples`` (samples this rank contributes per epoch: before
  padding, after the train drop).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from model import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from pipeline.augment.config import DEFAULT_NORM, AugConfig, Norm, check_norm

BACKENDS = ("dali", "torch")
BACKEND_CHOICES = ("auto",) + BACKENDS
DECODE_CHOICES = ("auto", "cpu", "gpu")


class Batch(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    ids: List[str]


def check_image_size(value: int, flag: str = "--image-size") -> int:
    """The one bound on a square input side, for every CLI and the loaders; returns ``value``."""
    if not isinstance(value, int) or isinstance(value, bool) or not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
        raise ValueError(f"{flag} {value!r}: must be a whole number of pixels in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] "
                         f"(the models downsample by 32)")
    return value


def resolve_backend(backend: str, device: Union[str, torch.device]) -> str:
    """``auto`` -> ``dali`` on a CUDA device when DALI is installed (nvJPEG decode + GPU ops), else
    ``torch`` (on a CPU its workers finish each image in uint8: the faster loader there); any other
    value is returned as it is."""
    if backend != "auto":
        return backend
    if torch.device(device).type == "cuda" and importlib.util.find_spec("nvidia.dali") is not None:
        return "dali"
    return "torch"


def dali_unsupported(aug: AugConfig, sources: int = 1) -> Optional[str]:
    """What the DALI backend does not implement for ``aug`` and ``sources`` pack outputs, as the flag
    that asks for it, or None (it does everything else)."""
    if aug.self_blend > 0:
        return "--self-blend"
    if sources > 1:
        return "--data (several sources)"
    return None


def derive_seed(*parts) -> int:
    """A stable 31-bit seed from any values such as ``(seed, epoch, rank, "aug")``: the same in every
    process (``hash()`` is not) and valid for DALI, whose seeds are signed 32-bit."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


@dataclass(frozen=True)
class LoaderSpec:
    """Every setting of a loader; validated on construction, errors name the flag.

    Attributes:
        data: a pack output folder (its manifest) or a shard pattern; or, for training with the torch
            backend, a tuple of several pack outputs read as one mixture (`pipeline.data.mixture`).
        split: the split to read (``train``, ``val``).
        train: training mode (shuffled, augmented, full batches, disjoint per rank) or eval mode.
        backend: ``dali``, ``torch``, or ``auto`` (`resolve_backend`); replaced by the concrete one.
        device: where batches are delivered (``cpu``, ``cuda``, ``cuda:N``).
        batch_size: samples per batch per rank.
        image_size: square side of the images delivered.
        aug: an `AugConfig`, a preset name, or None (``seed`` for train, ``none`` for eval);
            replaced by the `AugConfig`.
        rank / world_size: this process and the number of processes sharing the split.
        seed: seed of order and augmentation; the same on every rank.
        num_workers: worker processes (torch backend) or threads (DALI) per rank.
        storage_options: fsspec options for a pack output URL (`shard_tools.storage`).
        cache_dir: local folder for remote shards: the torch backend downloads each shard there once
            (verified) instead of streaming it every epoch; DALI, which reads local files only,
            always downloads remote shards (here, or in `default_cache_dir`).
        decode: where the torch backend decodes the JPEGs: ``cpu`` (its workers) or ``gpu`` (nvJPEG in
            the main process, CUDA devices only); ``auto`` is replaced by ``gpu`` on CUDA, else ``cpu``.
            DALI decodes with nvJPEG on CUDA and on the CPU otherwise, whatever this says.
        fakes: ``all``, or ``sbi-only``: training leaves the split's fakes out (reals and their
            self-blended pseudo-fakes only; needs ``aug.self_blend`` > 0). Evaluation always reads all.
        weights: with several ``data`` sources, the sampling weight of each (any positive numbers, made
            relative); None: each source in proportion to its size (every sample once per epoch).
        norm: ``(mean, std)`` of the normalisation (`pipeline.augment.config.Norm`): the model's.
    """

    data: str
    split: str
    train: bool
    backend: str = "auto"
    device: Union[str, torch.device] = "cpu"
    batch_size: int = 64
    image_size: int = 224
    aug: Union[AugConfig, str, None] = None
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    num_workers: int = 2
    storage_options: Optional[dict] = None
    cache_dir: Optional[str] = None
    fakes: str = "all"
    decode: str = "auto"
    weights: Optional[Tuple[float, ...]] = None
    norm: Norm = DEFAULT_NORM

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"--backend {self.backend!r}: choose one of {', '.join(BACKEND_CHOICES)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size!r}: must be >= 1")
        check_image_size(self.image_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if self.fakes not in ("all", "sbi-only"):
            raise ValueError(f"--fakes {self.fakes!r}: choose one of all, sbi-only")
        if self.num_workers < 0:
            raise ValueError(f"--workers {self.num_workers}: must be >= 0")
        if self.cache_dir is not None and os.path.lexists(self.cache_dir) and not os.path.isdir(self.cache_dir):
            raise ValueError(f"--cache-dir {self.cache_dir}: is a file, not a folder; give a folder for the downloaded shards")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"--device {self.device!r}: expected cpu, cuda or cuda:N") from None
        if self.decode not in DECODE_CHOICES:
            raise ValueError(f"--decode {self.decode!r}: choose one of {', '.join(DECODE_CHOICES)}")
        if self.decode == "gpu" and device.type != "cuda":
            raise ValueError(f"--decode gpu: needs a CUDA --device (nvJPEG), got {device}; use --decode cpu or auto")
        aug = self.aug
        if aug is None:
            aug = AugConfig.preset("seed" if self.train else "none")
        elif isinstance(aug, str):
            aug = AugConfig.preset(aug)
        object.__setattr__(self, "data", self._check_sources())
        object.__setattr__(self, "norm", check_norm(self.norm, "the normalisation (mean, std)"))
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "aug", aug)
        backend = resolve_backend(self.backend, device)
        if self.backend == "auto" and backend == "dali" and dali_unsupported(aug, len(self.sources)):
            backend = "torch"  # auto never picks a backend that cannot do what was asked
        object.__setattr__(self, "backend", backend)
        if self.decode == "auto":
            object.__setattr__(self, "decode", "gpu" if device.type == "cuda" else "cpu")

    @property
    def sources(self) -> Tuple[str, ...]:
        """The pack outputs read: ``(data,)``, or the tuple of several."""
        return self.data if isinstance(self.data, tuple) else (self.data,)

    def _check_sources(self) -> Union[str, Tuple[str, ...]]:
        """``data`` as one str, or a tuple of several; ValueError naming the flag for a bad combination."""
        one = isinstance(self.data, (str, os.PathLike))
        sources = (str(self.data),) if one else tuple(str(d) for d in self.data)
        if not sources:
            raise ValueError("--data: give at least one pack output")
        if self.weights is not None:
            if len(self.weights) != len(sources):
                raise ValueError(f"--data: {len(self.weights)} weights for {len(sources)} sources")
            if not all(isinstance(w, (int, float)) and math.isfinite(w) and w > 0 for w in self.weights):
                raise ValueError(f"--data: weights {list(self.weights)}: each must be a positive number")
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if len(sources) == 1:
            return sources[0]
        if not self.train:
            raise ValueError("--data: several sources are read together only for training; score each source's "
                             "split on its own")
        if self.fakes != "all":
            raise ValueError("--fakes sbi-only: not implemented with several --data sources")
        return sources

    def replace(self, **changes) -> "LoaderSpec":
        """A copy with some fields changed (validated again), e.g. the val spec from the train spec."""
        return dataclasses.replace(self, **changes)


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


def check_split_size(spec: LoaderSpec, total: int) -> int:
    """Steps per epoch for a ``total``-sample split; ValueError naming --batch-size when a training
    rank would not get one full batch, or when there are fewer eval samples than ranks."""
    steps = steps_per_epoch(total, spec.world_size, spec.batch_size, train=spec.train)
    if spec.train and steps == 0:
        raise ValueError(
            f"--batch-size {spec.batch_size}: larger than each process's share of the {spec.split!r} split of "
            f"{spec.data} ({total} samples / {spec.world_size} processes = {total // spec.world_size}); lower it"
        )
    if not spec.train and total < spec.world_size:
        raise ValueError(f"{spec.data}: the {spec.split!r} split has {total} samples, fewer than the "
                         f"{spec.world_size} processes")
    return steps


def drop_repeats(ids: Sequence[str], *columns: Sequence) -> Tuple[List[str], ...]:
    """Keep the first occurrence of each id (eval padding), and the same rows of each column."""
    seen = set()
    keep = []
    for i, key in enumerate(ids):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return ([ids[i] for i in keep],) + tuple([col[i] for i in keep] for col in columns)
