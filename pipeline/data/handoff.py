"""The torch backend's hand-off on a CPU: finished float batches in recycled shared memory.

On a CPU the workers and the main process share the same few cores, so every cycle the main
process spends on a batch is taken from the workers. The workers therefore finish each batch
completely: decoded, resized, augmented in uint8 into a private scratch batch, then normalised
float32 (`pipeline.augment.uint8_ops.normalize_into`, one table lookup per byte) written straight
into a shared-memory *slab*; what crosses the process boundary is the slab's number. The main
process wraps the slab as a tensor without a copy and hands it on.

Why slabs and not a fresh shared-memory batch per batch (as ``default_collate`` does): a fresh
38.5 MB batch (64 x 224 x 224 x 3 float32) costs ~9,400 page faults and a zero-fill, ~0.25 ms per
image, as much as decoding it. A `SlabPool` is allocated once per loader (before the workers
fork, so every epoch's workers share it), ``per_worker`` slabs per worker:

* a slab is free (0), filled by a worker (1) or lent out by the main process (2). A worker takes one
  of its own free slabs, marks it 1 and fills it (`SlabWriter.write`); the main process marks it 2
  when it wraps it as a tensor (`SlabPool.lend`) and 0 again when that tensor and every view of it
  are gone (``weakref.finalize`` on the numpy view the tensor holds). A slab is written by one
  worker only and each transition has one writer, so no lock is needed;
* when all of a worker's slabs are still held (a consumer that keeps many batches, e.g.
  ``list(loader)``), the worker does not wait: it sends a fresh shared-memory batch instead, so
  correctness never depends on the consumer releasing batches (`SlabPool.fresh` counts them);
* a batch a worker filled that never reached the main process (prefetched past the end of a
  training epoch, then dropped by DataLoader when the next epoch starts) stays 1: the worker frees
  its own such slabs when its next epoch begins (`SlabWriter.free_stale`), when DataLoader has
  already received or dropped everything it sent before.

Memory: ``workers x per_worker`` slabs of one batch each, allocated lazily by the kernel (a slab
never used costs nothing); it does not grow with the data or the epochs.
"""
from __future__ import annotations

import math
import weakref
from typing import List, NamedTuple, Tuple, Union

import numpy as np
import torch
from torch.utils.data import get_worker_info

from pipeline.augment import uint8_ops
from pipeline.augment.config import DEFAULT_NORM, Norm
from pipeline.data.shards import DataError

# One slab per batch a worker has in flight (DataLoader's prefetch_factor, 2) plus one for the batch
# the main process holds; more only helps consumers that keep batches, who get fresh ones instead.
SLABS_PER_WORKER = 3
FREE, FILLED, LENT = 0, 1, 2  # states of a slab (`SlabPool.writer.busy`)


class Slab(NamedTuple):
    """What a worker sends in place of its images: slab ``index`` holds the first ``n`` rows."""

    index: int
    n: int


def new_shared(shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, in shared memory (as ``default_collate``
    allocates its batches), so that sending it to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes)).view(shape)


class SlabWriter:
    """The worker-side half of a `SlabPool` (what is pickled into the workers' dataset)."""

    def __init__(self, data: torch.Tensor, busy: torch.Tensor, per_worker: int, table: np.ndarray) -> None:
        self.data, self.busy, self.per_worker, self.table = data, busy, per_worker, table

    def write(self, images: np.ndarray, worker: int) -> Union[Slab, torch.Tensor]:
        """Normalise uint8 [n, S, S, 3] ``images`` into a free slab of ``worker``; the `Slab`, or a fresh
        shared float32 batch when all of the worker's slabs are held."""
        n = images.shape[0]
        busy = self.busy.numpy()
        lo = worker * self.per_worker
        for index in range(lo, lo + self.per_worker):
            if busy[index] == FREE:
                busy[index] = FILLED
                uint8_ops.normalize_into(images, self.data[index, :n].numpy(), self.table)
                return Slab(index, n)
        out = new_shared(images.shape, torch.float32)
        uint8_ops.normalize_into(images, out.numpy(), self.table)
        return out

    def free_stale(self, worker: int) -> None:
        """At the start of an epoch in ``worker``: its slabs still marked filled (1) never reached the
        main process; they are free again."""
        busy = self.busy.numpy()
        lo = worker * self.per_worker
        stale = busy[lo:lo + self.per_worker]
        stale[stale == FILLED] = FREE


class SlabPool:
    """Shared-memory float32 batches recycled between a loader's workers and its main process; the workers
    normalise into them with ``norm`` (mean, std)."""

    def __init__(self, workers: int, batch_shape: Tuple[int, ...], per_worker: int = SLABS_PER_WORKER,
                 norm: Norm = DEFAULT_NORM) -> None:
        count = max(1, workers) * per_worker
        self.batch_shape, self.workers, self.per_worker = tuple(batch_shape), max(1, workers), per_worker
        # no worker processes (workers=0): plain memory, nothing to share
        alloc = new_shared_always if workers > 0 else (lambda shape, dtype: torch.empty(shape, dtype=dtype))
        try:
            self.writer = SlabWriter(alloc((count, *batch_shape), torch.float32), alloc((count,), torch.uint8).zero_(),
                                     per_worker, uint8_ops.normalize_table(norm))
        except (RuntimeError, MemoryError) as e:
            raise DataError(slab_error(e, count, batch_shape, shared=workers > 0)) from None
        self._arrays = self.writer.data.numpy()
        self._busy = self.writer.busy.numpy()
        self.fresh = 0  # batches that came as fresh shared memory because every slab was held

    def lend(self, item: Union[Slab, torch.Tensor]) -> torch.Tensor:
        """The float32 [n, S, S, 3] tensor of a worker's `Slab` (no copy); a fresh batch as it is."""
        if not isinstance(item, Slab):
            self.fresh += 1
            return item
        array = self._arrays[item.index, :item.n]
        self._busy[item.index] = LENT
        weakref.finalize(array, self._release, item.index)
        return torch.from_numpy(array)

    def _release(self, index: int) -> None:
        self._busy[index] = FREE


def slab_error(e: BaseException, count: int, batch_shape: Tuple[int, ...], *, shared: bool) -> str:
    """One line for a failed allocation of the slabs: how much, why (from torch's message), what to change."""
    text, nbytes = str(e), count * math.prod(batch_shape) * 4
    size = f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
    why = ("the file-size limit (ulimit -f) is below it (shared memory is a file in /dev/shm): raise the limit or "
           if "File too large" in text else "/dev/shm is full or too small: " if "No space left" in text
           else "not enough memory (or a memory limit: ulimit -v, a container's): ")
    return (f"cannot allocate the loader's {count} {'shared-memory ' if shared else ''}batches of "
            f"{'x'.join(map(str, batch_shape))} float32 ({size}): {why}lower --batch-size, --image-size or --workers")


def new_shared_always(shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory, in any process (inherited by forked workers,
    passed by handle to spawned ones)."""
    count = math.prod(shape)
    storage = torch.UntypedStorage._new_shared(max(1, count * torch.empty(0, dtype=dtype).element_size()))
    return torch.empty(0, dtype=dtype).set_(storage)[:count].view(shape)


def as_sent(item):
    """DataLoader's collate_fn: the worker's tuple as it is (its default would turn the numpy labels
    and parameters into tensors, each a shared-memory segment of its own)."""
    return item


def take(pending: List[tuple], n: int) -> Tuple[tuple, List[tuple]]:
    """Split ``n`` samples (or all, if fewer) off the front of a list of batches (tuples of tensors
    and lists, one row per sample); no copy for a whole one."""
    if len(pending[0][0]) == n or (len(pending) == 1 and len(pending[0][0]) < n):
        return pending[0], pending[1:]
    parts, rest, left = [], list(pending), n
    while rest and left:
        batch = rest.pop(0)
        k = min(left, len(batch[0]))
        parts.append(tuple(c[:k] for c in batch))
        if k < len(batch[0]):
            rest.insert(0, tuple(c[k:] for c in batch))
        left -= k
    merged = tuple([row for p in parts for row in p[i]] if isinstance(parts[0][i], list)
                   else torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
    return merged, rest
