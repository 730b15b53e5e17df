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

Workers decode (``torchvision.io.decode_image``, RGB) and resize (`pipeline.augment.resize_uint8`)
in uint8 and batch; the main process merges workers' partial batches, copies uint8 to the device
(pinned, non-blocking on CUDA) and runs `pipeline.torch_aug.augment_batch` there.

The sample counts come from the manifest; for a pattern of local shards they are counted by
reading the tar headers once. Remote patterns (``pipe:``, URLs) are refused: without counts no
rank can know its equal share of steps. Order depends on ``(seed, epoch, world_size,
num_workers)``: the same values give the same batches.

Errors: a missing/truncated shard (file size against the manifest in `pipeline.data`, the sample count of
every piece read), an unreadable tar member or an undecodable image raise `DataError` naming the
shard and the sample key; errors inside workers are sent back as messages, so the user sees
that one line, not a DataLoader traceback.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
# resize_uint8 imports this lazily: import it once here, before the workers fork, not once per worker.
import torchvision.transforms.v2.functional  # noqa: F401
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from torchvision.io import ImageReadMode, decode_image

from pipeline.augment import AugConfig, resize_uint8
from pipeline.data import VERIFY_HINT, DataError, resolve_shards
from pipeline.loaders import Batch, rank_share, steps_per_epoch
from pipeline.torch_aug import augment_batch

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "png", "webp")
SHUFFLE_BUFFER = 1000  # samples, held as encoded bytes (~10 KB each for 256 px JPEG faces)


def _seed(*parts) -> int:
    """A stable 63-bit seed from any values (``hash()`` differs between processes)."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


@dataclass(frozen=True)
class Piece:
    """Samples ``[start, stop)`` of one shard, ``size`` samples in all."""

    url: str
    start: int
    stop: int
    size: int


def plan_pieces(shards: Sequence[str], sizes: Sequence[int], order: Sequence[int], lo: int, hi: int) -> List[Piece]:
    """The pieces covering samples ``[lo, hi)`` of the shards concatenated in ``order``."""
    pieces, offset = [], 0
    for i in order:
        a, b = max(lo, offset), min(hi, offset + sizes[i])
        if a < b:
            pieces.append(Piece(shards[i], a - offset, b - offset, sizes[i]))
        offset += sizes[i]
    return pieces


def _hint(url: str, root: Optional[Path]) -> str:
    return VERIFY_HINT.format(root=root if root is not None else Path(url).parent)


class _Failure:
    """An error message sent from a worker in place of a batch (DataLoader would wrap the exception)."""

    def __init__(self, message: str) -> None:
        self.message = message


def _exn_text(exn: BaseException) -> str:
    # webdataset appends the stream and url to exn.args; keep only the library's own message.
    first = exn.args[0] if exn.args else ""
    return f"{type(exn).__name__}: {first}" if first else type(exn).__name__


class _ShardStream(IterableDataset):
    """One rank's samples for one epoch as uint8 batches ``(images, labels, ids)`` (webdataset)."""

    def __init__(self, shards: List[str], sizes: List[int], *, root: Optional[Path], image_size: int,
                 batch_size: int, train: bool, seed: int, epoch: int, rank: int, world_size: int) -> None:
        super().__init__()
        self.shards, self.sizes, self.root = shards, sizes, root
        self.image_size, self.batch_size, self.train = image_size, batch_size, train
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size

    def pieces(self, worker: int, num_workers: int) -> List[Piece]:
        order = list(range(len(self.shards)))
        if self.train:  # same on every rank, so the ranks' ranges partition one sequence
            random.Random(_seed(self.seed, self.epoch, "shards")).shuffle(order)
        n = sum(self.sizes)
        lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        wlo, whi = lo + (hi - lo) * worker // num_workers, lo + (hi - lo) * (worker + 1) // num_workers
        return plan_pieces(self.shards, self.sizes, order, wlo, whi)

    def read_pieces(self, pieces: Iterator[dict]) -> Iterator[dict]:
        """Raw samples of each piece; a short or unreadable shard raises DataError naming it."""
        for item in pieces:
            piece: Piece = item["piece"]
            samples = wds.tariterators.tarfile_samples([{"url": piece.url}], handler=wds.reraise_exception)
            index = 0
            try:
                for sample in samples:
                    if index >= piece.stop:
                        break
                    if index >= piece.start:
                        yield sample
                    index += 1
            except DataError:
                raise
            except Exception as exn:
                where = "cannot open it" if index == 0 else f"cannot read past sample {index}"
                raise DataError(f"shard {piece.url}: {where} ({_exn_text(exn)}): missing, truncated or corrupt; "
                                + _hint(piece.url, self.root)) from None
            finally:
                samples.close()
            if index < piece.stop:
                raise DataError(f"shard {piece.url} ends after {index} samples but should hold {piece.size}: "
                                "truncated or replaced; " + _hint(piece.url, self.root))

    def decode(self, sample: dict) -> Tuple[torch.Tensor, int, str]:
        key, url = sample["__key__"], sample.get("__url__", "?")
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        members = sorted(k for k in sample if not k.startswith("__"))
        if ext is None:
            raise DataError(f"shard {url}: sample {key} has no image member (.jpg/.png/.webp; it has "
                            f"{', '.join(members) or 'nothing'}); " + _hint(url, self.root))
        cls = sample.get("cls")
        if cls is None or cls.strip() not in (b"0", b"1"):
            raise DataError(f"shard {url}: sample {key}.cls is {cls!r}, expected ASCII 0 (real) or 1 (fake); "
                            + _hint(url, self.root))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
                image = decode_image(torch.frombuffer(bytearray(sample[ext]), dtype=torch.uint8),
                                     mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError) as exn:
            raise DataError(f"shard {url}: cannot decode {key}.{ext} ({_exn_text(exn)}); "
                            + _hint(url, self.root)) from None
        return resize_uint8(image, self.image_size), int(cls.strip()), key

    @staticmethod
    def collate(samples: List[Tuple[torch.Tensor, int, str]]) -> tuple:
        # default_collate stacks straight into shared memory inside a worker: no extra copy on the way out.
        images = default_collate([s[0] for s in samples])
        return images, torch.tensor([s[1] for s in samples], dtype=torch.uint8), [s[2] for s in samples]

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        pieces = self.pieces(worker, num_workers)
        items = [{"piece": p} for p in pieces]
        stages = [lambda: iter(items), self.read_pieces]  # a bare list would be taken as a list of stages
        if self.train:
            n = sum(p.stop - p.start for p in pieces)
            buf = max(1, min(SHUFFLE_BUFFER, n))
            rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker, "samples"))
            stages.append(wds.shuffle(buf, buf, rng=rng))
        stages += [wds.map(self.decode), wds.batched(self.batch_size, collation_fn=self.collate, partial=True)]
        try:
            yield from wds.DataPipeline(*stages)
        except DataError as exn:
            yield _Failure(str(exn))
        except Exception as exn:  # anything else still reaches the user as one line
            where = ", ".join(sorted({p.url for p in pieces})) or "no shards"
            yield _Failure(f"loading samples from {where} failed: {_exn_text(exn)}")


def count_samples(shard: str) -> int:
    """Samples in a local tar shard (distinct consecutive keys), read from the tar headers."""
    count, last = 0, None
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, _ = wds.tariterators.base_plus_ext(member.name)
                if key is not None and key != last:
                    count, last = count + 1, key
    except (OSError, tarfile.TarError) as exn:
        raise DataError(f"shard {shard}: cannot read it as a tar ({exn}); " + _hint(shard, None)) from None
    return count


def _shard_sizes(data: Union[str, Path], shardset) -> List[int]:
    if shardset.shard_sizes is not None:  # from the manifest (resolve_shards checked each tar's size)
        return list(shardset.shard_sizes)
    remote = [s for s in shardset.shards if s.startswith("pipe:") or "://" in s]
    if remote:
        raise DataError(
            f"{data}: the torch backend needs the sample count of every shard to give each rank equal steps, "
            f"and {remote[0]} is remote; pass a pack output folder (manifest.json) or local .tar shards"
        )
    logger.info("counting samples in %d shards of %s (no manifest)", len(shardset.shards), data)
    return [count_samples(s) for s in shardset.shards]


class TorchLoader:
    """The ``torch`` backend of `pipeline.loaders.build_loader`; see that module for the contract."""

    def __init__(self, data: Union[str, Path], split: str, *, device: Union[str, torch.device], batch_size: int,
                 image_size: int, train: bool, aug: AugConfig, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 2) -> None:
        shardset = resolve_shards(data, split)
        self.shards = list(shardset.shards)
        self.sizes = _shard_sizes(data, shardset)
        self.root = shardset.root
        self.device = torch.device(device)
        self.batch_size, self.image_size, self.train, self.aug = batch_size, image_size, train, aug
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0
        total = sum(self.sizes)
        self.total = total
        self.own = rank_share(total, rank, world_size)
        self.steps = steps_per_epoch(total, world_size, batch_size, train=train)
        if train:
            if self.steps == 0:
                raise DataError(f"{data}: split {split!r} has {total} samples, fewer than one batch of {batch_size} "
                                f"per rank over {world_size} ranks; lower --batch-size")
        else:
            if total < world_size:
                raise DataError(f"{data}: split {split!r} has {total} samples, fewer than {world_size} ranks")
            self.padded = math.ceil(total / world_size)
        # Every worker gets a contiguous range of at least one sample; more workers than that only idle.
        self.num_workers = min(num_workers, self.own)

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
        stream = _ShardStream(self.shards, self.sizes, root=self.root, image_size=self.image_size,
                              batch_size=self.batch_size, train=self.train, seed=self.seed, epoch=epoch,
                              rank=self.rank, world_size=self.world_size)
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
                            f"give it {self.own}; " + _hint(self.shards[0], self.root))
        if self.train:  # cannot happen when the counts are right: own // batch_size >= steps
            raise DataError(f"rank {self.rank} ran out of samples after {emitted} of {self.steps} batches")
        pad = self.padded - seen
        if pad and first is not None:
            pending.append((first[0][:1].repeat(pad, 1, 1, 1), first[1][:1].repeat(pad), first[2][:1] * pad))
        while pending:
            batch, pending = _take(pending, self.batch_size)
            yield batch

    def __iter__(self) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(_seed(self.seed, self.epoch, self.rank, "aug"))
        cuda = self.device.type == "cuda"
        for images, labels, ids in self._batches(self.epoch):
            if cuda and not images.is_pinned():
                images = images.pin_memory()
            images = images.to(self.device, non_blocking=cuda)
            labels = labels.to(self.device, non_blocking=cuda).float()
            yield Batch(augment_batch(images, self.aug, self.image_size, generator), labels, ids)


def _take(pending: List[tuple], n: int) -> Tuple[tuple, List[tuple]]:
    """Split ``n`` samples (or all, if fewer) off the front of a list of batches; no copy for a whole one."""
    if pending[0][0].shape[0] == n or (len(pending) == 1 and pending[0][0].shape[0] < n):
        return pending[0], pending[1:]
    parts, rest, left = [], list(pending), n
    while rest and left:
        images, labels, ids = rest.pop(0)
        k = min(left, images.shape[0])
        parts.append((images[:k], labels[:k], ids[:k]))
        if k < images.shape[0]:
            rest.insert(0, (images[k:], labels[k:], ids[k:]))
        left -= k
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            [i for p in parts for i in p[2]]), rest
