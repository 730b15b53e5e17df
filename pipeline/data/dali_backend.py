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

Bad data never reaches DALI: its CPU decoder takes the whole process down (SIGSEGV in its thread
pool) when one sample of a batch of more than ``4 * (threads + 1)`` fails to parse, and a stale or
swapped ``.idx`` makes it read garbage. No Python code can catch that, so the loader checks every
shard and index when it is built (`check_shards`; it reads the split once, in parallel threads) and
raises a `DataError` naming the shard and the sample instead. A shard changed *after* that check (while
a run reads it) can still crash DALI. Each pass drops its pipeline when it ends, also on an error;
`close` drops the one built ahead for the next pass.
"""
from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from pipeline.data.contract import Batch, LoaderSpec, check_split_size, dali_unsupported, derive_seed, rank_share
from pipeline.data.sample_source import check_sample
from pipeline.data.shards import DataError, ShardSet, default_cache_dir, localize
from pipeline.data.tar_reader import TarFormatError, iter_members, iter_samples
from shard_tools.fsutil import loads_json, sha256_matches

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


def _index_lines(index: str) -> Tuple[Optional[int], List[List[Tuple[str, int, int]]]]:
    """The header count and, per sample line, ``(ext, offset, size)`` of each member of a wds2idx
    index (``ext offset size`` v1.1, ``ext offset size name`` v1.2)."""
    try:
        with open(index, "rb") as f:
            head, *lines = f.read().split(b"\n")
    except OSError as e:
        raise DataError(f"DALI index {index}: cannot read it ({e.strerror})") from None
    parts = head.split()
    if len(parts) != 2 or not parts[0].startswith(b"v1") or not parts[1].isdigit():
        raise DataError(f"DALI index {index}: not a wds2idx index (header {head[:40]!r})")
    step = 4 if parts[0] == b"v1.2" else 3
    samples = []
    for n, line in enumerate(ln for ln in lines if ln.strip()):
        fields = line.split()
        try:
            samples.append([(fields[i].decode().lower(), int(fields[i + 1]), int(fields[i + 2]))
                            for i in range(0, len(fields), step)])
        except (ValueError, IndexError, UnicodeDecodeError):
            raise DataError(f"DALI index {index}: line {n + 2} is not 'ext offset size name' groups") from None
    return int(parts[1]), samples


def _tar_lines(shard: str) -> List[List[Tuple[str, int, int]]]:
    """What the index of ``shard`` must say: per sample, ``(ext, data offset, size)`` of its members."""
    samples: List[List[Tuple[str, int, int]]] = []
    last = None
    for key, ext, offset, size in iter_members(shard):
        if key != last:
            samples.append([])
            last = key
        samples[-1].append((ext, offset, size))
    return samples


def _check_index(shard: str, index: str, expected: Optional[int], hint: str) -> int:
    """The sample count of ``index`` after checking it line by line against the tar's members."""
    count, got = _index_lines(index)
    if expected is not None and count != expected:
        raise DataError(f"DALI index {index}: {count} samples, the manifest says {expected} for {shard}; {hint}")
    want = _tar_lines(shard)
    if len(got) != count or len(want) != count:
        raise DataError(f"DALI index {index}: header says {count} samples, it lists {len(got)} and {Path(shard).name} "
                        f"holds {len(want)}; rebuild it with wds2idx or re-pack; {hint}")
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    if bad:
        raise DataError(f"DALI index {index}: {len(bad)} of {count} sample lines do not match the members of "
                        f"{Path(shard).name} (line {bad[0] + 2}); it belongs to another tar, or the tar changed: "
                        f"rebuild it with wds2idx or re-pack; {hint}")
    return count


def _decodes(data: bytes) -> bool:
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return arr is not None and arr.size > 0


def check_shard(shard: str, index: str, expected: Optional[int], hint: str, sha256: Optional[str] = None) -> int:
    """Check ``shard`` and its ``index`` the way DALI will read them, before DALI opens them.

    DALI cannot be trusted with bad data: its CPU image decoder crashes the whole process (SIGSEGV in
    its thread pool, after or even before it reports the error) when one sample of a batch fails to
    parse, and a stale or swapped ``.idx`` makes it read garbage that it then tries to decode. So
    every index line must match the tar's members, and every sample must be what the packer wrote
    (`pipeline.data.sample_source.check_sample`: members, label, the SHA-256 of original image
    bytes); an image that no SHA-256 vouches for (normalised, or a foreign shard without json) must
    decode; and the shard's bytes must match the manifest's ``sha256`` (hashed once per version of the file,
    `shard_tools.fsutil.sha256_matches`). DataError naming the shard and the sample otherwise. Returns the
    shard's sample count.
    """
    try:
        if sha256 is not None and not sha256_matches(shard, sha256):
            raise DataError(f"shard {shard}: its SHA-256 differs from the manifest's: changed or replaced since "
                            f"packing; {hint}")
        count = _check_index(shard, index, expected, hint)
        n = 0
        for sample in iter_samples(shard):
            ext, _ = check_sample(sample, hint)
            if not _hash_checked(sample) and not _decodes(sample[ext]):
                raise DataError(f"shard {shard}: sample {sample['__key__']}.{ext} does not decode; {hint}")
            n += 1
    except TarFormatError as e:
        raise DataError(f"shard {shard}: cannot read it ({e}): truncated or corrupt; {hint}") from None
    except OSError as e:
        raise DataError(f"shard {shard}: cannot read it ({e.strerror or e}); {hint}") from None
    if n != count:
        raise DataError(f"shard {shard} holds {n} samples, its index {index} says {count}; {hint}")
    return n


def _hash_checked(sample: dict) -> bool:
    """True when `check_sample` compared the image bytes with the SHA-256 in the sample's json."""
    try:
        info = loads_json(sample["json"]) if "json" in sample else None
    except ValueError:
        return False
    return isinstance(info, dict) and isinstance(info.get("sha256"), str) and info.get("normalized") is None


def check_shards(shardset: ShardSet, threads: int = 1) -> int:
    """`check_shard` for every shard of the split (in parallel threads: hashing releases the GIL);
    raises the DataError of the first bad shard in split order; returns the split's sample count."""
    from concurrent.futures import ThreadPoolExecutor

    sizes = shardset.shard_sizes or [None] * len(shardset.shards)
    jobs = list(zip(shardset.shards, shardset.indexes, sizes, shardset.shard_sha256 or [None] * len(sizes)))
    with ThreadPoolExecutor(max(1, min(threads, len(jobs)))) as pool:
        return sum(pool.map(lambda job: check_shard(*job[:3], shardset.hint(), job[3]), jobs))


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
        missing = dali_unsupported(spec.aug, len(spec.sources))
        if missing:
            raise ValueError(f"{missing}: not implemented in the DALI backend; use --backend torch (or auto)")
        if shardset.remote:  # DALI reads local files: fetch the split once, verified, into the cache
            shardset = localize(shardset, spec.cache_dir or default_cache_dir(), progress=spec.rank == 0)
        total = check_shards(shardset, threads=max(1, spec.num_workers))
        check_split_size(spec, total)  # before DALI allocates buffers for a batch the split cannot fill
        if not spec.train:  # an eval batch pads to its full size: never decode more than a rank's share
            spec = spec.replace(batch_size=min(spec.batch_size, -(-total // spec.world_size)))
        self.spec, self.shardset = spec, shardset
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
                norm=self.spec.norm, rank=self.rank, world_size=self.world_size, reader_seed=seed,
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
        it = None
        try:
            try:
                it = DALIGenericIterator(
                    [pipe], list(self._ops.OUTPUTS), reader_name=self._ops.READER_NAME,
                    last_batch_policy=LastBatchPolicy.DROP if self.train else LastBatchPolicy.FILL,
                    auto_reset=False, prepare_first_batch=False,
                )
            except RuntimeError as e:
                raise self._data_error(e) from None
            for _ in range(self._steps):
                yield self._to_batch(self._next(it))
        finally:
            # An error's traceback keeps this frame alive: drop the pipeline here, not at interpreter exit.
            it = pipe = None

    def _next(self, it) -> dict:
        try:
            return next(it)[0]
        except StopIteration:
            raise RuntimeError(
                f"DALI ended the epoch of rank {self.rank} before {self._steps} steps "
                f"({self.split_samples} samples, world_size {self.world_size}): please report this"
            ) from None
        except RuntimeError as e:
            raise self._data_error(e) from None

    def close(self) -> None:
        """Release the DALI pipeline built ahead for the next pass (its threads and buffers); iterating
        again builds a new one."""
        self._pipe = None

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
