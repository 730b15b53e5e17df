"""torchvision backend: webdataset stream -> uint8 decode + resize in workers -> augment on the device.

How a split is divided (the same for train and eval): the shards, in an order shuffled from
``(seed, epoch)`` for training and in manifest order for evaluation, are seen as one sequence of
``N`` samples. Rank ``r`` of ``W`` takes the contiguous range ``[N*r//W, N*(r+1)//W)`` of it, and
each DataLoader worker a contiguous sub-range of that; a range becomes "pieces" (shard, first
sample, end sample). So ranks and workers split by *sample*, never by whole shard: fewer shards
than ranks x workers cannot leave a worker idle or a rank short, every rank gets ``N//W`` or
``N//W + 1`` samples, and a rank reads only its own shards (plus the head of a shard it starts in
the middle of, which is read and skipped, not decoded).

* train: a sample shuffle buffer per worker (seeded from ``(seed, epoch, rank, worker)``), full
  batches only, every rank stops after ``(N//W)//batch_size`` steps, so DDP never waits.
* eval: no shuffling; ranks with ``N//W`` samples repeat their first sample once so that every
  rank yields the same number of batches of the same sizes (drop repeats by id).

Workers read the tar members (`pipeline.data.tar_reader`), decode (OpenCV, RGB), draw each sample's
augmentation parameters (`pipeline.augment.params.draw_params`, seeded from ``(seed, epoch, rank,
worker)``) and write uint8 HWC images straight into a shared-memory batch. What runs where depends
on the device:

* CUDA: workers only resize (`pipeline.augment.uint8_ops.resize_into`); the main process copies the uint8
  batch to the GPU (pinned, non-blocking) and augments it there with the workers' parameters
  (`pipeline.augment.batch_ops.apply_params`), in float, then normalises.
* CPU: the same cores do all the work wherever it runs, so workers also apply the augmentation,
  per sample in uint8 (`pipeline.augment.uint8_ops.process_into`: one OpenCV warp, no float), and the main
  process only normalises (`pipeline.augment.uint8_ops.normalize_hwc`: one table lookup per byte). The
  images come out channels-last (an NCHW tensor with NHWC memory), which CPU convolutions take as is.

The sample counts come from the manifest; for a pattern of local shards they are counted by
reading the tar headers once. Remote patterns (``pipe:``, URLs) are refused: without counts no
rank can know its equal share of steps. Order depends on ``(seed, epoch, world_size,
num_workers)``: the same values give the same batches.

Errors: a missing/truncated shard (file size against the manifest in `pipeline.data.shards`, the sample count of
every piece read), an unreadable tar member or an undecodable image raise `DataError` naming the
shard and the sample key; errors inside workers are sent back as messages, so the user sees
that one line, not a DataLoader traceback.
"""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.augment import uint8_ops
from pipeline.augment.batch_ops import apply_params, normalize_
from pipeline.augment.config import AugConfig
from pipeline.augment.params import draw_params, params_from_tensor, params_to_tensor
from pipeline.augment.self_blend import pseudo_fake_or_real
from pipeline.data import tar_reader
from pipeline.data.contract import Batch, LoaderSpec, check_split_size, derive_seed, rank_share
from pipeline.data.sample_source import Piece, SampleSource, check_sample, plan_pieces
from pipeline.data.shards import VERIFY_HINT, DataError, ShardSet
from pipeline.data.tar_reader import TarFormatError

logger = logging.getLogger(__name__)


SBI_SUFFIX = "#sbi"  # ids of pseudo-fakes: never confused with their source sample
SHUFFLE_BUFFER = 1000  # samples, held as encoded bytes (~10 KB each for 256 px JPEG faces)


class _Failure:
    """An error message sent from a worker in place of a batch (DataLoader would wrap the exception)."""

    def __init__(self, message: str) -> None:
        self.message = message


def _exn_text(exn: BaseException) -> str:
    # webdataset appends the stream and url to exn.args; keep only the library's own message.
    first = exn.args[0] if exn.args else ""
    return f"{type(exn).__name__}: {first}" if first else type(exn).__name__


class _ShardStream(IterableDataset):
    """One rank's samples for one epoch as uint8 batches ``(images NHWC, labels, ids, params)``.

    ``finish``: apply the augmentation in the workers (CPU runs); otherwise only resize and ship the
    drawn parameters (a [N, K] float64 tensor, `pipeline.augment.params.params_to_tensor`) for the device.
    """

    def __init__(self, shardset: ShardSet, sizes: List[int], *, source: SampleSource, image_size: int,
                 batch_size: int, train: bool, aug: AugConfig, finish: bool, seed: int, epoch: int, rank: int,
                 world_size: int, reals_only: bool = False) -> None:
        super().__init__()
        self.reals_only = reals_only
        self.shardset, self.shards, self.sizes, self.source = shardset, list(shardset.shards), sizes, source
        self.image_size, self.batch_size, self.train = image_size, batch_size, train
        self.aug, self.finish = aug, finish
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size

    def pieces(self, worker: int, num_workers: int) -> List[Piece]:
        order = list(range(len(self.shards)))
        if self.train:  # same on every rank, so the ranks' ranges partition one sequence
            random.Random(derive_seed(self.seed, self.epoch, "shards")).shuffle(order)
        n = sum(self.sizes)
        lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        wlo, whi = lo + (hi - lo) * worker // num_workers, lo + (hi - lo) * (worker + 1) // num_workers
        return plan_pieces(self.shards, self.sizes, order, wlo, whi, self.shardset.shard_bytes,
                           self.shardset.shard_sha256)

    def read_pieces(self, pieces: Iterator[dict]) -> Iterator[dict]:
        """Checked raw samples of each piece (`pipeline.data.sample_source`)."""
        for item in pieces:
            yield from self.source.samples(item["piece"])

    def decode(self, sample: dict) -> Tuple[np.ndarray, int, str]:
        key, url = sample["__key__"], sample.get("__url__", "?")
        ext, label = check_sample(sample, self.source.hint)
        try:
            image = uint8_ops.decode(sample[ext]) if sample[ext] else None
        except cv2.error as exn:
            raise DataError(f"shard {url}: cannot decode {key}.{ext} (OpenCV: {str(exn).strip()}); "
                            + self.source.hint) from None
        if image is None:
            raise DataError(f"shard {url}: cannot decode {key}.{ext} ({len(sample[ext])} bytes: not a readable "
                            "JPEG/PNG/WebP); " + self.source.hint)
        return image, label, key

    def blend(self, image: np.ndarray, label: int, key: str) -> Tuple[np.ndarray, int, str]:
        """A real sample, maybe turned into its self-blended pseudo-fake (label 1, id ``KEY#sbi``),
        drawn from (seed, epoch, key): the same whatever the rank, worker or batch it lands in."""
        rng = np.random.default_rng(derive_seed(self.seed, self.epoch, key, "sbi"))
        image, fake = pseudo_fake_or_real(image, rng, self.aug.self_blend)
        return (image, 1, key + SBI_SUFFIX) if fake else (image, label, key)

    def process(self, samples: List[dict], generator: torch.Generator) -> tuple:
        """Decode one batch of raw samples into a new uint8 [N, S, S, 3] batch (shared memory in a worker)."""
        decoded = [self.decode(s) for s in samples]
        if self.train and self.aug.self_blend > 0:
            decoded = [self.blend(*d) if d[1] == 0 else d for d in decoded]
        n, size = len(decoded), self.image_size
        params = None if self.aug.is_identity else draw_params(n, self.aug, generator)
        images = _new_batch((n, size, size, 3))
        uint8_ops.process_into([d[0] for d in decoded], images.numpy(), params, crop=self.aug.preprocess == "crop",
                               finish=self.finish)
        shipped = params_to_tensor(params) if params is not None and not self.finish else torch.empty(n, 0)
        return images, torch.tensor([d[1] for d in decoded], dtype=torch.uint8), [d[2] for d in decoded], shipped

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        pieces = self.pieces(worker, num_workers)
        items = [{"piece": p} for p in pieces]
        stages = [lambda: iter(items), self.read_pieces]  # a bare list would be taken as a list of stages
        if self.train and self.reals_only:
            stages.append(wds.select(lambda sample: sample.get("cls", b"").strip() == b"0"))
        if self.train:
            n = sum(p.stop - p.start for p in pieces)
            buf = max(1, min(SHUFFLE_BUFFER, n))
            rng = random.Random(derive_seed(self.seed, self.epoch, self.rank, worker, "samples"))
            stages.append(wds.shuffle(buf, buf, rng=rng))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.rank, worker, "aug"))
        stages += [wds.batched(self.batch_size, collation_fn=list, partial=True),
                   wds.map(lambda samples: self.process(samples, generator))]
        try:
            yield from wds.DataPipeline(*stages)
        except DataError as exn:
            yield _Failure(str(exn))
        except Exception as exn:  # anything else still reaches the user as one line
            where = ", ".join(sorted({p.url for p in pieces})) or "no shards"
            yield _Failure(f"loading samples from {where} failed: {_exn_text(exn)}")


def _new_batch(shape: Tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor; in a DataLoader worker, in shared memory (as ``default_collate``
    allocates its batches), so that sending it to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def count_samples(shard: str) -> int:
    """Samples in a local tar shard, counted from the tar headers with the reader's own grouping."""
    try:
        return tar_reader.count_samples(shard)
    except (OSError, TarFormatError) as exn:
        raise DataError(f"shard {shard}: cannot read it as a tar ({exn}); "
                        + VERIFY_HINT.format(root=Path(shard).parent)) from None


def _shard_sizes(data: Union[str, Path], shardset) -> List[int]:
    if shardset.shard_sizes is not None:  # from the manifest (resolve_shards checked each tar's size)
        return list(shardset.shard_sizes)
    logger.info("counting samples in %d shards of %s (no manifest)", len(shardset.shards), data)
    return [count_samples(s) for s in shardset.shards]


class TorchLoader:
    """The ``torch`` backend of `pipeline.data.loader.build_loader`; see that module for the contract."""

    def __init__(self, spec: LoaderSpec, shardset: ShardSet) -> None:
        self.spec, self.shardset = spec, shardset
        self.shards = list(shardset.shards)
        self.sizes = _shard_sizes(spec.data, shardset)
        self.source = SampleSource(hint=shardset.hint(), storage_options=shardset.storage_options,
                                   cache_dir=spec.cache_dir)
        self.device = spec.device
        self.batch_size, self.image_size, self.train, self.aug = spec.batch_size, spec.image_size, spec.train, spec.aug
        self.rank, self.world_size, self.seed = spec.rank, spec.world_size, spec.seed
        self.epoch = 0
        self.pool = uint8_ops.BufferPool()
        self.split_samples = sum(self.sizes)
        self.own = rank_share(self.split_samples, self.rank, self.world_size)
        self.steps = check_split_size(spec, self._train_samples(spec, shardset))
        self.padded = math.ceil(self.split_samples / self.world_size)
        # Every worker gets a contiguous range of at least one sample; more workers than that only idle.
        self.num_workers = min(spec.num_workers, self.own)

    def _train_samples(self, spec: LoaderSpec, shardset: ShardSet) -> int:
        """Samples the steps are counted from: the split, or with ``fakes='sbi-only'`` its reals
        less a 3% margin (the packer interleaves the classes, so every rank's part holds about its
        share of them; the margin keeps a rank from running out, which would stall the others)."""
        if not (spec.train and spec.fakes == "sbi-only"):
            return self.split_samples
        if "real" not in shardset.class_counts:
            raise DataError(f"{spec.data}: --fakes sbi-only needs the per-class counts of a pack output's manifest")
        return int(shardset.class_counts["real"] * 0.97)

    @property
    def num_samples(self) -> int:
        """Samples this rank contributes per epoch (train: after dropping; eval: before padding)."""
        return self.steps * self.batch_size if self.train else self.own

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self, epoch: int) -> Iterator[tuple]:
        """uint8 batches of exactly ``batch_size`` (eval: the last may be smaller), padded for eval."""
        stream = _ShardStream(self.shardset, self.sizes, source=self.source, image_size=self.image_size,
                              batch_size=self.batch_size, train=self.train, aug=self.aug,
                              finish=self.device.type != "cuda", seed=self.seed, epoch=epoch, rank=self.rank,
                              world_size=self.world_size, reals_only=self.spec.fakes == "sbi-only")
        uint8_ops.single_threaded()  # before the workers fork (see there)
        source = iter(stream) if self.num_workers == 0 else iter(DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
        ))
        pending: List[tuple] = []
        seen = emitted = 0
        first: Optional[tuple] = None
        for item in source:
            if isinstance(item, _Failure):
                raise DataError(item.message)
            if first is None:
                first = item
            seen += item[0].shape[0]
            pending.append(item)
            while sum(p[0].shape[0] for p in pending) >= self.batch_size:
                batch, pending = _take(pending, self.batch_size)
                yield batch
                emitted += 1
                if self.train and emitted == self.steps:
                    return
        if seen != self.own:
            raise DataError(f"rank {self.rank} read {seen} samples of {self.shards[0]}...; the shards should "
                            f"give it {self.own}; " + self.source.hint)
        if self.train:  # cannot happen when the counts are right: own // batch_size >= steps
            raise DataError(f"rank {self.rank} ran out of samples after {emitted} of {self.steps} batches")
        pad = self.padded - seen
        if pad and first is not None:
            pending.append(tuple(c[:1] * pad if isinstance(c, list) else c[:1].repeat_interleave(pad, 0)
                                 for c in first))
        while pending:
            batch, pending = _take(pending, self.batch_size)
            yield batch

    def __iter__(self) -> Iterator[Batch]:
        cuda = self.device.type == "cuda"
        for images, labels, ids, params in self._batches(self.epoch):
            if not cuda:  # the workers augmented already (pipeline.augment.uint8_ops)
                yield Batch(uint8_ops.normalize_hwc(images, self.pool), labels.float(), ids)
                continue
            if not images.is_pinned():
                images = images.pin_memory()
            x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
            labels = labels.to(self.device, non_blocking=True).float()
            if params.shape[1]:
                x = apply_params(x, params_from_tensor(params), self.image_size)
            yield Batch(normalize_(x.float()), labels, ids)


def _take(pending: List[tuple], n: int) -> Tuple[tuple, List[tuple]]:
    """Split ``n`` samples (or all, if fewer) off the front of a list of batches (tuples of tensors
    and lists, one row per sample); no copy for a whole one."""
    if pending[0][0].shape[0] == n or (len(pending) == 1 and pending[0][0].shape[0] < n):
        return pending[0], pending[1:]
    parts, rest, left = [], list(pending), n
    while rest and left:
        batch = rest.pop(0)
        k = min(left, batch[0].shape[0])
        parts.append(tuple(c[:k] for c in batch))
        if k < batch[0].shape[0]:
            rest.insert(0, tuple(c[k:] for c in batch))
        left -= k
    merged = tuple([row for p in parts for row in p[i]] if isinstance(parts[0][i], list)
                   else torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
    return merged, rest
