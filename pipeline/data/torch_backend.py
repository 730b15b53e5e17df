"""torchvision backend: webdataset stream -> uint8 decode + resize in workers -> augment on the device.

How a split is divided (the same for train and eval; `pipeline.data.mixture`): the shards, in an
order shuffled from ``(seed, epoch)`` for training and in manifest order for evaluation, are seen as
one sequence of ``N`` samples. Rank ``r`` of ``W`` takes the contiguous range ``[N*r//W, N*(r+1)//W)``
of it, and each DataLoader worker a contiguous sub-range of that; a range becomes "pieces" (shard,
first sample, end sample). So ranks and workers split by *sample*, never by whole shard: fewer shards
than ranks x workers cannot leave a worker idle or a rank short, every rank gets ``N//W`` or
``N//W + 1`` samples, and a rank reads only its own shards (plus the head of a shard it starts in
the middle of, which is read and skipped, not decoded). Several sources (training): each source's
share of the epoch follows its weight and is divided the same way; a worker reads its pieces of all
of them interleaved (`pipeline.data.mixture.SplitPlan`).

* train: a sample shuffle buffer per worker (seeded from ``(seed, epoch, rank, worker)``), full
  batches only, every rank stops after ``(N//W)//batch_size`` steps, so DDP never waits.
* eval: no shuffling; ranks with ``N//W`` samples repeat their first sample once (equal batches; drop by id).

Workers read the tar members (`pipeline.data.sample_source`), draw each sample's augmentation
parameters (`pipeline.augment.params.draw_params`, seeded from ``(seed, epoch, rank, worker)``) and,
depending on the device and ``spec.decode``, take each batch this far (``mode``):

* CPU (``finish``): the same cores do all the work wherever it runs, so the workers do all of it:
  decode (OpenCV, RGB), resize and augment per sample in uint8 (`pipeline.augment.uint8_ops.process_into`:
  one OpenCV warp, no float), then write the normalised float32 straight into a recycled
  shared-memory batch (`pipeline.data.handoff`); the main process only hands the tensor on. The
  images come out channels-last (an NCHW tensor with NHWC memory), which CPU convolutions take as is.
* CUDA, ``decode="cpu"`` (``resize``): workers decode and resize to uint8
  (`pipeline.augment.uint8_ops.resize_into`) in a shared-memory batch; the main process copies it to
  the GPU (pinned, non-blocking) and augments it there with the workers' parameters
  (`pipeline.augment.batch_ops.apply_params`), in float, then normalises.
* CUDA, ``decode="gpu"`` (``encoded``, the default on CUDA): workers only read and batch the JPEG
  bytes (non-JPEG samples are decoded and resized by the worker); the main process decodes the
  batch with nvJPEG and resizes it on the GPU (`pipeline.data.encoded`), then augments and
  normalises as above. float work stays on the GPU; only uint8 or encoded bytes cross processes.

Self-blending (training): on a CPU and for crops the workers blend each chosen real image at native size
(`pipeline.augment.self_blend`; the mask on the face-stage box of the sample's json where it has one); in the
CUDA modes they only draw the choices (and read the face box) and the main process blends the batch on the
GPU (`pipeline.augment.self_blend_batch`, the same mask placement). Choices come from ``(seed, epoch, key)``
either way.

The sample counts come from the manifest; for a pattern of local shards they are counted by reading the tar
headers once. Remote patterns (``pipe:``, URLs) are refused: without counts no rank knows its share of steps. Order depends on ``(seed, epoch, world_size,
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
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.augment import uint8_ops
from pipeline.augment.batch_ops import apply_params, normalize_
from pipeline.augment.config import AugConfig
from pipeline.augment.params import draw_params, params_from_tensor, params_to_tensor
from pipeline.augment.face_mask import sample_face_box
from pipeline.augment.self_blend import BLEND, pseudo_fake_or_real
from pipeline.augment.self_blend_batch import blend_batch, choice_table, keep_table
from pipeline.data.contract import Batch, LoaderSpec, check_split_size, derive_seed
from pipeline.data.encoded import batch_rows, decode_batch, encode_batch, is_jpeg
from pipeline.data.handoff import SlabPool, SlabWriter, as_sent, new_shared, take
from pipeline.data.mixture import SplitPlan
from pipeline.data.sample_source import Piece
from pipeline.data.shards import DataError, ShardSet
from shard_tools.format import IMAGE_EXTS

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
    """One rank's samples for one epoch as batches ``(images, labels, ids, params, blend table)``.

    ``mode`` says how far the workers take each batch: ``finish`` (CPU runs) decode, augment and
    normalise into a slab (`pipeline.data.handoff`); ``resize`` (CUDA, CPU decode) decode and resize
    to uint8 and ship the drawn parameters (`pipeline.augment.params.params_to_tensor`) for the device;
    ``encoded`` (GPU decode) ship the JPEG bytes and the parameters (`pipeline.data.encoded`).
    """

    def __init__(self, plan: SplitPlan, *, image_size: int, batch_size: int, train: bool, aug: AugConfig, mode: str,
                 writer: Optional[SlabWriter], seed: int, rank: int, world_size: int, reals_only: bool = False,
                 blend_on_batch: bool = False) -> None:
        super().__init__()
        self.reals_only, self.blend_on_batch = reals_only, blend_on_batch
        self.plan, self.hint = plan, plan.hint()
        self.image_size, self.batch_size, self.train = image_size, batch_size, train
        self.aug, self.mode, self.writer = aug, mode, writer
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # set by the main process before each epoch; persistent workers read it when the epoch starts
        self.epoch_box = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._epoch: Optional[int] = None  # the epoch being read, in the process reading it

    @property
    def epoch(self) -> int:
        """The epoch this process is reading (fixed when its pass begins), else the one set last."""
        return int(self.epoch_box[0]) if self._epoch is None else self._epoch

    def pieces(self, worker: int, num_workers: int) -> List[List[Piece]]:
        """Per source, the pieces this worker reads this epoch (`pipeline.data.mixture.SplitPlan.pieces`)."""
        return self.plan.pieces(self.epoch, self.rank, self.world_size, worker, num_workers)

    def decode(self, sample: dict) -> Tuple[np.ndarray, int, str]:
        key, url = sample["__key__"], sample.get("__url__", "?")
        ext, label = _ext_label(sample)
        try:
            image = uint8_ops.decode(sample[ext]) if sample[ext] else None
        except cv2.error as exn:
            raise DataError(f"shard {url}: cannot decode {key}.{ext} (OpenCV: {str(exn).strip()}); "
                            + self.hint) from None
        if image is None:
            raise DataError(f"shard {url}: cannot decode {key}.{ext} ({len(sample[ext])} bytes: not a readable "
                            "JPEG/PNG/WebP); " + self.hint)
        return image, label, key

    def blend(self, image: np.ndarray, label: int, key: str, sample: dict) -> Tuple[np.ndarray, int, str]:
        """A real sample, maybe its pseudo-fake (label 1, ``KEY#sbi``; mask on its face box if it has one)."""
        rng = np.random.default_rng(derive_seed(self.seed, self.epoch, key, "sbi"))
        image, fake = pseudo_fake_or_real(image, rng, self.aug.self_blend,
                                          face_box=sample_face_box(sample) if self.aug.sbi_mask == "face" else None)
        return (image, 1, key + SBI_SUFFIX) if fake else (image, label, key)

    def choose(self, labels: np.ndarray, ids: List[str], samples: List[dict]
               ) -> Tuple[np.ndarray, List[str], np.ndarray]:
        """``blend_on_batch``: each real sample's choice row (`self_blend_batch.choice_table`, with its face box
        under ``--sbi-mask face``), drawn as `blend` draws, pseudo-fakes labelled 1 and ``KEY#sbi`` here; else
        all as it is, a table without columns."""
        if not self.blend_on_batch:
            return labels, ids, np.empty((len(ids), 0))
        real = np.flatnonzero(labels == 0)
        table = keep_table(len(ids))  # true fakes stay KEEP rows without a box
        boxes = [sample_face_box(samples[i]) for i in real] if self.aug.sbi_mask == "face" else None
        table[real] = choice_table([np.random.default_rng(derive_seed(self.seed, self.epoch, ids[i], "sbi"))
                                    for i in real], self.aug.self_blend, boxes=boxes)
        fake = table[:, 0] == BLEND
        ids = [k + SBI_SUFFIX if f else k for k, f in zip(ids, fake)]
        return np.where(fake, 1, labels).astype(np.uint8), ids, table

    def process(self, samples: List[dict], generator: torch.Generator, worker: int) -> tuple:
        """Raw samples -> ``(images, labels, ids, params, blend table)`` as ``mode`` says (all but images numpy)."""
        n, size = len(samples), self.image_size
        params = None if self.aug.is_identity else draw_params(n, self.aug, generator)
        shipped = params_to_tensor(params).numpy() if params is not None and self.mode != "finish" else np.empty((n, 0))
        if self.mode == "encoded":  # JPEG bytes as they are; anything else decoded here
            metas = [_ext_label(s) for s in samples]
            payloads = [s[ext] if is_jpeg(s[ext]) else self.decode(s)[0] for s, (ext, _) in zip(samples, metas)]
            labels, ids, table = self.choose(np.array([m[1] for m in metas], dtype=np.uint8),
                                             [s["__key__"] for s in samples], samples)
            return encode_batch(payloads, size), labels, ids, shipped, table
        decoded = [self.decode(s) for s in samples]
        if self.train and self.aug.self_blend > 0 and not self.blend_on_batch:
            decoded = [self.blend(*d, s) if d[1] == 0 else d for d, s in zip(decoded, samples)]
        labels, ids, table = self.choose(np.array([d[1] for d in decoded], dtype=np.uint8), [d[2] for d in decoded],
                                         samples)
        crop = self.aug.preprocess == "crop"
        if self.mode == "finish":
            scratch = self._scratch(n)
            uint8_ops.process_into([d[0] for d in decoded], scratch, params, crop=crop)
            return self.writer.write(scratch, worker), labels, ids, shipped, table
        images = new_shared((n, size, size, 3), torch.uint8)
        uint8_ops.process_into([d[0] for d in decoded], images.numpy(), params, crop=crop, finish=False)
        return images, labels, ids, shipped, table

    def _scratch(self, n: int) -> np.ndarray:
        """This process's uint8 batch that the augmentation writes before the float goes to a slab."""
        if getattr(self, "_uint8", None) is None:
            self._uint8 = np.empty((self.batch_size, self.image_size, self.image_size, 3), dtype=np.uint8)
        return self._uint8[:n]

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None and not getattr(self, "_heap_set", False):  # once per worker process
            self._heap_set = uint8_ops.steady_heap()
        if self.writer is not None:  # slabs of the last epoch that never reached the main process
            self.writer.free_stale(worker)
        # read once: the main process may set the next epoch while this one's last batches are made
        self._epoch = epoch = int(self.epoch_box[0])
        per_source = self.pieces(worker, num_workers)
        pieces = [p for ps in per_source for p in ps]
        mix = np.random.default_rng(derive_seed(self.seed, epoch, self.rank, worker, "mix"))
        stages = [lambda: self.plan.read(per_source, mix)]
        if self.train and self.reals_only:
            stages.append(wds.select(lambda sample: sample.get("cls", b"").strip() == b"0"))
        if self.train:
            n = sum(p.stop - p.start for p in pieces)
            buf = max(1, min(SHUFFLE_BUFFER, n))
            rng = random.Random(derive_seed(self.seed, epoch, self.rank, worker, "samples"))
            stages.append(wds.shuffle(buf, buf, rng=rng))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, worker, "aug"))
        stages += [wds.batched(self.batch_size, collation_fn=list, partial=True),
                   wds.map(lambda samples: self.process(samples, generator, worker))]
        try:
            yield from wds.DataPipeline(*stages)
        except DataError as exn:
            yield _Failure(str(exn))
        except Exception as exn:  # anything else still reaches the user as one line
            where = ", ".join(sorted({p.url for p in pieces})) or "no shards"
            yield _Failure(f"loading samples from {where} failed: {_exn_text(exn)}")


def _ext_label(sample: dict) -> Tuple[str, int]:
    """Image member and label of a sample that `SampleSource.samples` has checked already (checking
    it twice cost ~8% of the whole per-sample work)."""
    return next(e for e in IMAGE_EXTS if e in sample), int(sample["cls"].strip())


class TorchLoader:
    """The ``torch`` backend of `pipeline.data.loader.build_loader`; see that module for the contract.

    ``decode_device``: decode the JPEGs of each batch in the main process on this device
    (`pipeline.data.encoded`) instead of where ``spec.decode`` says (``gpu``: ``spec.device``, ``cpu``:
    the workers); ``"cpu"`` runs the GPU-decode path with torchvision's CPU decoder (tests).
    """

    def __init__(self, spec: LoaderSpec, shardset: Union[ShardSet, Sequence[ShardSet]], *,
                 decode_device: Optional[Union[str, torch.device]] = None) -> None:
        self.shardsets = [shardset] if isinstance(shardset, ShardSet) else list(shardset)
        self.spec, self.shardset = spec, self.shardsets[0]
        self.plan = SplitPlan.build(spec, self.shardsets)
        self.shards = list(self.shardset.shards)
        self.device = spec.device
        if decode_device is None and spec.decode == "gpu":
            decode_device = spec.device
        if decode_device is not None and spec.aug.preprocess == "crop":
            logger.info("torch backend: the workers decode (crop preprocessing needs the pixels on the CPU), "
                        "not --decode gpu")
            decode_device = None
        self.decode_device = torch.device(decode_device) if decode_device is not None else None
        self.mode = ("encoded" if self.decode_device is not None
                     else "resize" if self.device.type == "cuda" else "finish")
        # self-blending on the device batch of whole images; per image in the workers on a CPU and for
        # crops (a mask of the crop would not be a mask of the face)
        self.blend_on_batch = (spec.train and spec.aug.self_blend > 0 and self.mode != "finish"
                               and spec.aug.preprocess == "resize")
        self.batch_size, self.image_size, self.train, self.aug = spec.batch_size, spec.image_size, spec.train, spec.aug
        self.rank, self.world_size, self.seed = spec.rank, spec.world_size, spec.seed
        self.epoch = 0
        self._own: Optional[tuple] = None  # (stream, slabs, persistent DataLoader): see _open
        self._active = 0  # iterations open now
        self.split_samples = self.plan.split_samples
        self.own = self.plan.rank_samples(self.rank, self.world_size)
        self.steps = check_split_size(spec, self._train_samples(spec, self.shardset))
        self.padded = math.ceil(self.split_samples / self.world_size)
        # Every worker gets a contiguous range of at least one sample; more workers than that only idle.
        self.num_workers = min(spec.num_workers, self.own)

    def _train_samples(self, spec: LoaderSpec, shardset: ShardSet) -> int:
        """Samples the steps are counted from: the split (training: the smallest rank's part times the
        ranks), or with ``fakes='sbi-only'`` its reals less a 3% margin (the packer interleaves the
        classes, so every rank's part holds about its share of them; the margin keeps a rank from
        running out, which would stall the others)."""
        if not spec.train:
            return self.split_samples
        if spec.fakes != "sbi-only":
            return self.plan.min_rank_samples(self.world_size) * self.world_size
        if not shardset.class_counts.get("real"):  # it trains on the reals alone
            raise DataError(f"{spec.data}: --fakes sbi-only trains on the real images of the {spec.split!r} split; it "
                            f"{'has none' if 'real' in shardset.class_counts else 'lists no per-class counts'}")
        return int(shardset.class_counts["real"] * 0.97)

    @property
    def num_samples(self) -> int:
        """Samples this rank contributes per epoch (train: after dropping; eval: before padding)."""
        return self.steps * self.batch_size if self.train else self.own

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _make(self, persistent: bool) -> tuple:
        """``(stream, slab pool or None, DataLoader or None)`` for this loader's settings."""
        pool = SlabPool(self.num_workers, (self.batch_size, self.image_size, self.image_size, 3),
                        norm=self.spec.norm) if self.mode == "finish" else None
        stream = _ShardStream(self.plan, image_size=self.image_size,
                              batch_size=self.batch_size, train=self.train, aug=self.aug, mode=self.mode,
                              writer=pool.writer if pool else None, seed=self.seed, rank=self.rank,
                              world_size=self.world_size, reals_only=self.spec.fakes == "sbi-only",
                              blend_on_batch=self.blend_on_batch)
        dl = None if self.num_workers == 0 else DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.mode == "resize",
            collate_fn=as_sent, persistent_workers=persistent)
        return stream, pool, dl

    def _open(self, epoch: int) -> Tuple[Iterator, Optional[SlabPool], Callable[[], None]]:
        """This epoch's worker batches, and what to call when the epoch is over.

        The loader's own workers persist from epoch to epoch (no fork and start-up per epoch; the
        epoch reaches them through shared memory); while another iteration of this loader is still
        open, this one gets workers and slabs of its own, shut down at its end.
        """
        uint8_ops.single_threaded()  # before the workers fork (see there)
        shared = self._active == 0
        if shared and self._own is None:
            self._own = self._make(persistent=True)
        stream, pool, dl = self._own if shared else self._make(persistent=False)
        stream.epoch_box[0] = epoch
        source = iter(stream) if dl is None else iter(dl)
        if shared:
            return source, pool, lambda: None
        return source, pool, getattr(source, "_shutdown_workers", lambda: None)

    def close(self) -> None:
        """Stop the persistent workers now (they also stop when the loader is garbage collected)."""
        own, self._own = self._own, None
        iterator = getattr(own[2], "_iterator", None) if own is not None and own[2] is not None else None
        if iterator is not None:
            iterator._shutdown_workers()

    def _batches(self, epoch: int) -> Iterator[tuple]:
        """Batches of exactly ``batch_size`` (eval: the last may be smaller), padded for eval: float32
        NHWC finished by the workers on a CPU, uint8 NHWC resized (and the drawn parameters) on CUDA."""
        source, pool, close = self._open(epoch)
        self._active += 1
        try:
            yield from self._assemble(source, pool)
        finally:
            self._active -= 1
            close()

    def _assemble(self, source: Iterator, pool: Optional[SlabPool]) -> Iterator[tuple]:
        pending: List[tuple] = []
        seen = emitted = 0
        first: Optional[tuple] = None
        for item in source:
            if isinstance(item, _Failure):
                raise DataError(item.message)
            images, labels, ids, params, table = item
            if pool is not None:
                images = pool.lend(images)
            elif self.mode == "encoded":
                images = batch_rows(images)
            item = (images, torch.from_numpy(labels), ids, torch.from_numpy(params), torch.from_numpy(table))
            if first is None:  # a copy of one row, not a hold on the whole batch (a slab) all epoch
                first = tuple(c[:1] if isinstance(c, list) else c[:1].clone() for c in item)
            seen += len(ids)
            pending.append(item)
            while sum(len(p[0]) for p in pending) >= self.batch_size:
                batch, pending = take(pending, self.batch_size)
                yield batch
                emitted += 1
                if self.train and emitted == self.steps:
                    return
        if seen != self.own:
            raise DataError(f"rank {self.rank} read {seen} samples of {self.shards[0]}...; the shards should "
                            f"give it {self.own}; " + self.plan.hint())
        if self.train:  # cannot happen when the counts are right: own // batch_size >= steps
            raise DataError(f"rank {self.rank} ran out of samples after {emitted} of {self.steps} batches")
        pad = self.padded - seen
        if pad and first is not None:
            pending.append(tuple(c * pad if isinstance(c, list) else c.repeat_interleave(pad, 0) for c in first))
        while pending:
            batch, pending = take(pending, self.batch_size)
            yield batch

    def __iter__(self) -> Iterator[Batch]:
        for images, labels, ids, params, table in self._batches(self.epoch):
            if self.mode == "finish":  # finished by the workers (pipeline.data.handoff): only the NCHW view is left
                yield Batch(images.permute(0, 3, 1, 2), labels.float(), ids)
                continue
            if self.mode == "encoded":
                x = decode_batch(images, ids, self.image_size, self.decode_device, self.plan.hint())
            else:
                if not images.is_pinned():
                    images = images.pin_memory()
                x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
            if table.shape[1]:
                x = blend_batch(x, table)
            x = apply_params(x, params_from_tensor(params), self.image_size) if params.shape[1] else x.float()
            labels = labels.to(self.device, non_blocking=True).float()
            yield Batch(normalize_(x, self.spec.norm).to(self.device, non_blocking=True), labels, ids)
