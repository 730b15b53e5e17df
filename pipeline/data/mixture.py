"""Which samples of which shards each worker of the torch backend reads in an epoch, from one source or several.

One source (every split, train or eval): the shards, in an order shuffled from ``(seed, epoch)`` for
training and in manifest order for evaluation, are one sequence of ``N`` samples; rank ``r`` of ``W``
takes ``[N*r//W, N*(r+1)//W)`` of it and each of its workers a contiguous sub-range, cut into pieces
``(shard, first sample, end sample)`` (`pipeline.data.sample_source.plan_pieces`).

Several sources (training; ``--data A --data B`` or ``--data A:0.7,B:0.3``): an epoch has
``T = sum(n_s)`` samples, as one pack of all of them would. Source ``s`` gets ``q_s`` of them (`quotas`):
``n_s`` without weights (every sample once), else ``T * w_s / sum(w)`` rounded by largest remainder, so
the quotas add up to ``T``. Its epoch sequence is ``q_s`` samples of endless passes over its shards, all
passes of an epoch in one order shuffled from ``(seed, epoch, s)``, starting (with weights) at an offset
drawn from ``(seed, epoch, s)``: a source weighted above its size share is read more than once per
epoch (each repeat with its own augmentation draws), one weighted below it gives another subset of
distinct samples each epoch (a cyclic window of the pass). Rank ``r``
takes ``[q_s*r//W, q_s*(r+1)//W)`` of every source and its workers contiguous sub-ranges of that, so
every rank gets ``sum(q_s // W)`` samples or a few more: steps stay equal across ranks (the smallest
rank's full batches) and DDP never waits. A worker reads its pieces of all sources interleaved sample
by sample in an order shuffled from ``(seed, epoch, rank, worker)`` (`interleave`: one index and one
``next`` per sample, nothing else), so every batch mixes the sources in their proportion, before the
usual shuffle buffer.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import numpy as np

from pipeline.data.contract import LoaderSpec, derive_seed, rank_share
from pipeline.data.sample_source import Piece, SampleSource, plan_pieces
from pipeline.data.shards import DataError, ShardSet, sample_counts


def quotas(sizes: Sequence[int], weights: Optional[Sequence[float]]) -> List[int]:
    """Samples per epoch of each source: ``sizes`` without weights, else ``sum(sizes)`` shared by weight
    (largest remainder; ties to the earlier source), adding up to ``sum(sizes)``."""
    if weights is None or len(sizes) == 1:
        return list(sizes)
    total, wsum = sum(sizes), float(sum(weights))
    raw = [total * w / wsum for w in weights]
    out = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (out[i] - raw[i], i))[: total - sum(out)]:
        out[i] += 1
    return out


@dataclass
class Source:
    """One pack output's split as the plan reads it: shards, samples per shard, epoch quota, reader."""

    shardset: ShardSet
    sizes: List[int]
    quota: int
    reader: SampleSource

    @property
    def samples(self) -> int:
        return sum(self.sizes)


class SplitPlan:
    """The pieces each (rank, worker) reads per epoch; see the module docstring. Picklable (workers get it)."""

    def __init__(self, sources: List[Source], *, seed: int, train: bool, weighted: bool = False) -> None:
        if len(sources) > 1 and not train:
            raise ValueError("several sources are read together only for training")
        self.sources, self.seed, self.train = sources, seed, train
        self.mixed = len(sources) > 1
        self.weighted = weighted and self.mixed  # quotas differ from the sizes: windows at random offsets

    @classmethod
    def build(cls, spec: LoaderSpec, shardsets: Sequence[ShardSet]) -> "SplitPlan":
        """The plan of ``spec`` (its ``sources``, ``weights``, ``seed``, ``train``) over their resolved splits."""
        sizes = [sample_counts(ss, data) for ss, data in zip(shardsets, spec.sources)]
        sources = [Source(ss, n, q, SampleSource(hint=ss.hint(), storage_options=ss.storage_options,
                                                 cache_dir=spec.cache_dir))
                   for ss, n, q in zip(shardsets, sizes, quotas([sum(n) for n in sizes], spec.weights))]
        return cls(sources, seed=spec.seed, train=spec.train, weighted=spec.weights is not None)

    def hint(self) -> str:
        """What to run when a shard is bad (`pipeline.data.shards.VERIFY_HINT` of the pack output)."""
        if not self.mixed:
            return self.sources[0].reader.hint
        roots = ", ".join(str(s.shardset.root) for s in self.sources)
        return f"run `deepfake-inspect PACK --verify` on the pack output that holds it ({roots})"

    @property
    def split_samples(self) -> int:
        """Samples in all the sources' splits together (also the samples of one epoch)."""
        return sum(s.samples for s in self.sources)

    def rank_samples(self, rank: int, world_size: int) -> int:
        """Samples rank ``rank`` reads per epoch (before the train drop or eval padding)."""
        return sum(rank_share(s.quota, rank, world_size) for s in self.sources)

    def min_rank_samples(self, world_size: int) -> int:
        return min(self.rank_samples(r, world_size) for r in range(world_size))

    def _order(self, epoch: int, index: int) -> List[int]:
        order = list(range(len(self.sources[index].sizes)))
        if self.train:  # the same on every rank, so the ranks' ranges partition one sequence
            parts = (self.seed, epoch, "shards") if index == 0 else (self.seed, epoch, "shards", index)
            random.Random(derive_seed(*parts)).shuffle(order)
        return order

    def _range(self, epoch: int, index: int, lo: int, hi: int) -> List[Piece]:
        """Pieces of positions ``[lo, hi)`` of source ``index``'s epoch sequence (laps over its shards)."""
        src = self.sources[index]
        n = src.samples
        if n == 0 or lo >= hi:
            return []
        shift = derive_seed(self.seed, epoch, "offset", index) % n if self.weighted else 0
        lo, hi = lo + shift, hi + shift
        order = self._order(epoch, index)
        pieces: List[Piece] = []
        for lap in range(lo // n, (hi - 1) // n + 1):
            a, b = max(lo, lap * n) - lap * n, min(hi, (lap + 1) * n) - lap * n
            pieces += plan_pieces(src.shardset.shards, src.sizes, order, a, b,
                                  src.shardset.shard_bytes, src.shardset.shard_sha256)
        return pieces

    def pieces(self, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> List[List[Piece]]:
        """Per source, the pieces worker ``worker`` of rank ``rank`` reads in ``epoch``."""
        out = []
        for index, src in enumerate(self.sources):
            lo, hi = src.quota * rank // world_size, src.quota * (rank + 1) // world_size
            wlo, whi = lo + (hi - lo) * worker // num_workers, lo + (hi - lo) * (worker + 1) // num_workers
            out.append(self._range(epoch, index, wlo, whi))
        return out

    def read(self, pieces: List[List[Piece]], rng: np.random.Generator) -> Iterator[dict]:
        """The checked raw samples of ``pieces`` (from `pieces`): one source's in order, several interleaved."""
        streams = [self._stream(src.reader, ps) for src, ps in zip(self.sources, pieces)]
        if not self.mixed:
            return streams[0]
        counts = [sum(p.stop - p.start for p in ps) for ps in pieces]
        return interleave(streams, counts, rng)

    @staticmethod
    def _stream(reader: SampleSource, pieces: List[Piece]) -> Iterator[dict]:
        for piece in pieces:
            yield from reader.samples(piece)


def interleave(streams: Sequence[Iterator[dict]], counts: Sequence[int], rng: np.random.Generator) -> Iterator[dict]:
    """``counts[i]`` items of each of ``streams``, in an order shuffled by ``rng``."""
    schedule = np.repeat(np.arange(len(streams)), counts)
    rng.shuffle(schedule)
    for i in schedule.tolist():
        try:
            yield next(streams[i])
        except StopIteration:  # cannot happen: SampleSource checks every piece's sample count
            raise DataError(f"source {i} ran out of samples before its share of the epoch") from None
