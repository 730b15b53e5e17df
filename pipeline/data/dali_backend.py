"""DALI backend of `pipeline.data.loader.build_loader` (contract in that module's docstring).

One DALI pipeline per process: ``fn.readers.webdataset`` over the split's shards and ``.idx``
files, split by sample with ``shard_id=rank, num_shards=world_size``; decode with nvJPEG
(``mixed``) and augment with GPU ops on CUDA, or with CPU ops and ``device_id=None`` without it
(`pipeline.data.dali_graph`).

Epochs: each pass runs a pipeline built for ``(seed, epoch)``: the shard order (train) and the
seeds of the shuffle buffer and of every random op derive from it, so a resumed run sees the same
order and augmentation. Rebuilding is cheap (no file scan: the ``.idx`` files give the layout).

Steps: DALI gives rank ``r`` the samples ``[N*r//W, N*(r+1)//W)`` of the split. Train runs
``(N//W) // batch_size`` steps on every rank (partial batch dropped); eval pads each rank's part by
repeating its last sample (``pad_last_batch``) to ``ceil(ceil(N/W) / batch_size)`` full batches.
"""
from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from pipeline.data.contract import Batch, LoaderSpec, check_split_size, dali_unsupported, derive_seed, rank_share
from pipeline.data.shards import DataError, ShardSet, default_cache_dir, localize

logger = logging.getLogger(__name__)

# Cap of the shuffle buffer (encoded samples held in memory per rank); packed shards are already
# interleaved across classes, and the shard order is shuffled per epoch on top of it.
MAX_SHUFFLE_BUFFER = 4096

# DALI operators whose errors mean bad data (a truncated tar, a stale index, an undecodable image).
DATA_OPS = ("readers.webdataset", "decoders.image", "peek_image_shape", "get_property")


def _dali_ops():
    """Import the DALI graph module, or say how to run without DALI."""
    try:
        dali_ops = importlib.import_module("pipeline.data.dali_graph")
    except ImportError as e:
        raise ValueError(
            f"--backend dali: NVIDIA DALI cannot be imported ({e}); install nvidia-dali-cuda120 "
            "or use --backend torch"
        ) from e
    return dali_ops


def check_index(shard: str, index: str, expected: Optional[int]) -> None:
    """Check that ``index`` (a wds2idx file) fits ``shard``: DALI itself crashes on a tar that is
    shorter than its index says, so a truncated shard is caught here, naming the file."""
    try:
        with open(index, "rb") as f:
            header = f.readline().split()
            last = None
            for line in f:
                if line.strip():
                    last = line
    except OSError as e:
        raise DataError(f"DALI index {index}: cannot read it ({e.strerror})") from None
    if len(header) != 2 or not header[0].startswith(b"v1") or not header[1].isdigit():
        raise DataError(f"DALI index {index}: not a wds2idx index (header {b' '.join(header)[:40]!r})")
    count = int(header[1])
    if expected is not None and count != expected:
        raise DataError(f"DALI index {index}: {count} samples, the manifest says {expected} for {shard}")
    if last is None:
        return
    fields = last.split()
    try:
        # each component: "ext offset size" (v1.1) or "ext offset size name" (v1.2)
        step = 4 if header[0] == b"v1.2" else 3
        end = max(int(fields[i + 1]) + int(fields[i + 2]) for i in range(0, len(fields), step))
    except (ValueError, IndexError):
        raise DataError(f"DALI index {index}: malformed last line {last[:80]!r}") from None
    try:
        size = Path(shard).stat().st_size
    except OSError as e:
        raise DataError(f"shard {shard}: cannot read it ({e.strerror})") from None
    if size < end:
        raise DataError(f"shard {shard} is truncated: {size} bytes, its index {index} needs at least {end}")


def parse_source_info(row: np.ndarray) -> tuple:
    """Zero-padded ``b"path/shard.tar:offset:key.ext"`` -> (shard path, key)."""
    text = bytes(row).rstrip(b"\0").decode("utf-8", errors="replace")
    shard, _, member = text.rsplit(":", 2)
    return shard, member.split(".", 1)[0]


class DaliLoader:
    """Batches of one split from DALI; see `pipeline.data.loader` for the contract.

    ``seed`` must be the same on every rank: the shard order of an epoch derives from it, and the
    ranks' parts of the split are disjoint only when they agree on that order.
    """

    def __init__(self, spec: LoaderSpec, shardset: ShardSet) -> None:
        missing = dali_unsupported(spec.aug)
        if missing:
            raise ValueError(f"{missing}: not implemented in the DALI backend; use --backend torch (or auto)")
        if shardset.remote:  # DALI reads local files: fetch the split once, verified, into the cache
            shardset = localize(shardset, spec.cache_dir or default_cache_dir(), progress=spec.rank == 0)
        self.spec, self.shardset = spec, shardset
        sizes = shardset.shard_sizes or [None] * len(shardset.shards)
        try:
            for shard, index, expected in zip(shardset.shards, shardset.indexes, sizes):
                check_index(shard, index, expected)
        except DataError as e:
            raise DataError(f"{e}; " + self._hint()) from None
        self.batch_size, self.image_size, self.train, self.aug = spec.batch_size, spec.image_size, spec.train, spec.aug
        self.rank, self.world_size, self.seed = spec.rank, spec.world_size, spec.seed
        self.num_threads = max(1, spec.num_workers)
        self.device = spec.device
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"--device {self.device}: CUDA is not available here; use --device cpu")
            self.device_id: Optional[int] = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", self.device_id)
        elif self.device.type == "cpu":
            self.device_id = None
        else:
            raise ValueError(f"--device {self.device}: the DALI backend runs on cpu or cuda only")
        self._ops = _dali_ops()
        self._epoch = 0
        self._pipe = None
        self._pipe_epoch: Optional[int] = None
        self._pipe = self._build(self._epoch)  # validates the shards now and gives the split size
        self.split_samples = int(self._pipe.reader_meta(self._ops.READER_NAME)["epoch_size"])
        self._steps = check_split_size(spec, self.split_samples)
        self.num_samples = (self._steps * self.batch_size if self.train
                            else rank_share(self.split_samples, self.rank, self.world_size))

    # -- epochs -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Make the next pass deterministic from ``(seed, epoch)``."""
        self._epoch = int(epoch)

    def __len__(self) -> int:
        return self._steps

    def _build(self, epoch: int):
        shards = list(self.shardset.shards)
        indexes = list(self.shardset.indexes)
        seed = derive_seed(self.seed, epoch)
        if self.train:
            # Same permutation on every rank (same seed/epoch): the per-sample split stays disjoint.
            order = np.random.default_rng(seed).permutation(len(shards))
            shards, indexes = [shards[i] for i in order], [indexes[i] for i in order]
        sizes = self.shardset.shard_sizes
        per_rank = (sum(sizes) // self.world_size) if sizes else MAX_SHUFFLE_BUFFER
        try:
            pipe = self._ops.build_pipeline(
                shards, indexes, device_id=self.device_id, train=self.train, aug=self.aug,
                image_size=self.image_size, batch_size=self.batch_size, num_threads=self.num_threads,
                rank=self.rank, world_size=self.world_size, reader_seed=seed,
                # per rank: otherwise sample i of every rank's batch would draw the same transform
                op_seed=derive_seed(self.seed, epoch, self.rank),
                initial_fill=max(1, min(per_rank, MAX_SHUFFLE_BUFFER)),
            )
        except RuntimeError as e:
            raise self._data_error(e) from None
        self._pipe_epoch = epoch
        logger.debug("DALI pipeline for %s epoch %d (rank %d/%d, seed %d, %s)", self.shardset.split, epoch,
                     self.rank, self.world_size, seed, "cpu" if self.device_id is None else f"gpu {self.device_id}")
        return pipe

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if self._pipe is None or self._pipe_epoch != self._epoch:
            self._pipe = None  # free the old pipeline's threads and buffers before building anew
            self._pipe = self._build(self._epoch)
        pipe, self._pipe = self._pipe, None  # a pipeline serves one pass
        try:
            it = DALIGenericIterator(
                [pipe], list(self._ops.OUTPUTS), reader_name=self._ops.READER_NAME,
                last_batch_policy=LastBatchPolicy.DROP if self.train else LastBatchPolicy.FILL,
                auto_reset=False, prepare_first_batch=False,
            )
        except RuntimeError as e:
            raise self._data_error(e) from None
        for _ in range(self._steps):
            try:
                out = next(it)[0]
            except StopIteration:
                raise RuntimeError(
                    f"DALI ended the epoch of rank {self.rank} before {self._steps} steps "
                    f"({self.split_samples} samples, world_size {self.world_size}): please report this"
                ) from None
            except RuntimeError as e:
                raise self._data_error(e) from None
            yield self._to_batch(out)

    def _to_batch(self, out: dict) -> Batch:
        info = out["info"].numpy()
        parsed = [parse_source_info(row) for row in info]
        ids = [key for _, key in parsed]
        cls = out["labels"][:, 0]
        bad = ((cls != ord("0")) & (cls != ord("1"))).nonzero().flatten().tolist()
        if bad:
            shard, key = parsed[bad[0]]
            raise DataError(
                f"{shard}: sample {key}.cls holds {bytes(out['labels'][bad[0]].tolist()).rstrip(bytes(1))!r}, "
                f"expected ASCII 0 (real) or 1 (fake); " + self._hint()
            )
        labels = (cls - ord("0")).to(torch.float32).to(self.device, non_blocking=True)
        images = out["images"].to(self.device, non_blocking=True)
        return Batch(images, labels, ids)

    # -- errors -------------------------------------------------------------------------------
    def _hint(self) -> str:
        return self.shardset.hint()

    def _data_error(self, err: RuntimeError) -> Exception:
        """DALI's deep error about the data -> one line naming the shard (or shard list) and the fix.

        Errors of other operators (a bug, not bad data) are returned unchanged.
        """
        text = str(err)
        if not any(op in text for op in DATA_OPS):
            return err
        pairs = zip(self.shardset.shards, self.shardset.indexes)
        named = [s for s, i in pairs if s in text or i in text or Path(s).name in text or Path(i).name in text]
        shards = self.shardset.shards
        listed = ", ".join(shards[:3]) + (f", ... ({len(shards)} shards)" if len(shards) > 3 else "")
        where = f"shard {named[0]}" if named else f"one of the shards {listed}"
        reason = text.split("encountered:", 1)[-1]
        reason = next((ln.strip() for ln in reason.splitlines() if ln.strip() and "pipeline" not in ln), "")
        reason = re.sub(r"\s+", " ", reason)[:300]
        return DataError(f"{where}: DALI cannot read the {self.shardset.split!r} split ({reason}); " + self._hint())
