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

* a worker takes one of its own slabs whose ``busy`` flag is 0, sets it to 1 and fills it
  (`SlabWriter.write`); only that worker sets a slab's flag 0 -> 1, only the main process 1 -> 0, so
  no lock is needed;
* the main process lends the slab out as a tensor (`SlabPool.lend`); when that tensor and every
  view of it are gone (``weakref.finalize`` on the numpy view the tensor holds), the flag goes
  back to 0;
* when all of a worker's slabs are still held (a consumer that keeps many batches, e.g.
  ``list(loader)``), the worker does not wait: it sends a fresh shared-memory batch instead, so
  correctness never depends on the consumer releasing batches (`SlabPool.fresh` counts them);
* at the end of an iteration, when its workers have exited, slabs that are not lent out are
  marked free again (a batch left in the queue of a loader stopped early never reaches the main).

Memory: ``workers x per_worker`` slabs of one batch each, allocated lazily by the kernel (a slab
never used costs nothing); it does not grow with the data or the epochs.
"""
from __future__ import annotations

import math
import weakref
from typing import NamedTuple, Optional, Set, Tuple, Union

import numpy as np
import torch
from torch.utils.data import get_worker_info

from pipeline.augment import uint8_ops

# One slab per batch a worker has in flight (DataLoader's prefetch_factor, 2) plus one for the batch
# the main process holds; more only helps consumers that keep batches, who get fresh ones instead.
SLABS_PER_WORKER = 3


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

    def __init__(self, data: torch.Tensor, busy: torch.Tensor, per_worker: int) -> None:
        self.data, self.busy, self.per_worker = data, busy, per_worker

    def write(self, images: np.ndarray, worker: int) -> Union[Slab, torch.Tensor]:
        """Normalise uint8 [n, S, S, 3] ``images`` into a free slab of ``worker``; the `Slab`, or a fresh
        shared float32 batch when all of the worker's slabs are held."""
        n = images.shape[0]
        busy = self.busy.numpy()
        lo = worker * self.per_worker
        for index in range(lo, lo + self.per_worker):
            if busy[index] == 0:
                busy[index] = 1
                uint8_ops.normalize_into(images, self.data[index, :n].numpy())
                return Slab(index, n)
        out = new_shared(images.shape, torch.float32)
        uint8_ops.normalize_into(images, out.numpy())
        return out


class SlabPool:
    """Shared-memory float32 batches recycled between a loader's workers and its main process."""

    def __init__(self, workers: int, batch_shape: Tuple[int, ...], per_worker: int = SLABS_PER_WORKER) -> None:
        count = max(1, workers) * per_worker
        self.batch_shape, self.workers, self.per_worker = tuple(batch_shape), max(1, workers), per_worker
        self.writer = SlabWriter(new_shared_always((count, *batch_shape), torch.float32),
                                 new_shared_always((count,), torch.uint8).zero_(), per_worker)
        self._arrays = self.writer.data.numpy()
        self._busy = self.writer.busy.numpy()
        self._lent: Set[int] = set()
        self.in_use = False  # an iteration owns the pool (`TorchLoader` makes another for a second one)
        self.fresh = 0  # batches that came as fresh shared memory because every slab was held

    def fits(self, workers: int, batch_shape: Tuple[int, ...]) -> bool:
        return not self.in_use and self.workers == max(1, workers) and self.batch_shape == tuple(batch_shape)

    def lend(self, item: Union[Slab, torch.Tensor]) -> torch.Tensor:
        """The float32 [n, S, S, 3] tensor of a worker's `Slab` (no copy); a fresh batch as it is."""
        if not isinstance(item, Slab):
            self.fresh += 1
            return item
        array = self._arrays[item.index, :item.n]
        self._lent.add(item.index)
        weakref.finalize(array, self._release, item.index)
        return torch.from_numpy(array)

    def _release(self, index: int) -> None:
        self._lent.discard(index)
        self._busy[index] = 0

    def reset(self) -> None:
        """After an iteration's workers have exited: free every slab not lent out."""
        for index in range(self._busy.shape[0]):
            if index not in self._lent:
                self._busy[index] = 0
        self.in_use = False


def new_shared_always(shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory, in any process (inherited by forked workers,
    passed by handle to spawned ones)."""
    nbytes = max(1, math.prod(shape) * torch.empty(0, dtype=dtype).element_size())
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes))[: math.prod(shape)].view(shape)


def lend_labels(labels: Optional[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(labels) if isinstance(labels, np.ndarray) else labels
