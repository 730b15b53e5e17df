"""Measurement harness of `pipeline.bench`: one fresh process per row, warm-up, timed windows, memory.

Each row runs in its own spawned process (`run_row`), so its peak resident memory is its own and
not what earlier rows left in the allocator. Inside that process `TreeMonitor` samples the RSS and
CPU time of the process and all its descendants (DataLoader / DALI / pool workers) in a background
thread; `measure_stream` pulls batches from a row's stream: ``warmup`` batches, then ``repeats``
timed windows of ``batches`` batches each.
"""
from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Tuple

import psutil

logger = logging.getLogger(__name__)


class SkipRow(Exception):
    """A row that cannot run here (no CUDA, no DALI, no image folders); the message is the reason."""


@dataclass
class Stream:
    """What a row hands to `measure_stream`.

    Attributes:
        batches: an endless iterator yielding ``(images, bytes)`` per batch (bytes may be 0).
        sync: called at the edges of each timed window (``torch.cuda.synchronize`` on CUDA).
        close: releases workers; always called.
        processes: how many processes do the work (for the table).
    """

    batches: Iterator[Tuple[int, int]]
    sync: Callable[[], None] = lambda: None
    close: Callable[[], None] = lambda: None
    processes: int = 1


class TreeMonitor:
    """Samples memory and CPU seconds of this process and its descendants every ``interval`` seconds.

    RSS of the tree is the sum over processes, so pages shared between a parent and its forked
    workers (torch's libraries, copy-on-write data) are counted once per process: an upper bound.
    PSS (proportional set size: shared pages split between the processes sharing them) is the
    honest footprint; reading it costs a few ms per process, so it is sampled every ``pss_every``
    polls (and at the start and end of every timed window).
    """

    def __init__(self, interval: float = 0.05, pss_every: int = 4) -> None:
        self.interval = interval
        self.pss_every = pss_every
        self.root = psutil.Process(os.getpid())
        self.peak_rss = 0
        self.peak_pss = 0
        self.start_pss = 0
        self.peak_procs = 1
        self._polls = 0
        self._cpu: Dict[int, float] = {}  # pid -> last seen user+system seconds (kept after exit)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)

    def __enter__(self) -> "TreeMonitor":
        self.poll(pss=True)
        self.start_pss = self.peak_pss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll(pss=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self, pss: bool = False) -> float:
        """Take one sample now; return the CPU seconds of the tree so far."""
        self._polls += 1
        pss = pss or self._polls % self.pss_every == 0
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            procs = [self.root]
        rss = pss_sum = 0
        with self._lock:
            for p in procs:
                try:
                    with p.oneshot():
                        if pss:
                            info = p.memory_full_info()
                            pss_sum += getattr(info, "pss", info.rss)  # no PSS outside Linux
                        else:
                            info = p.memory_info()
                        rss += info.rss
                        t = p.cpu_times()
                        self._cpu[(p.pid, p.create_time())] = t.user + t.system
                except psutil.Error:
                    continue  # exited between listing and reading
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss_sum)
            self.peak_procs = max(self.peak_procs, len(procs))
            return sum(self._cpu.values())

    def memory(self) -> dict:
        """Peak memory of the tree so far, in MB (and the row process's PSS before the row began)."""
        self.poll(pss=True)
        return {"peak_rss_mb": round(self.peak_rss / 1e6, 1), "peak_pss_mb": round(self.peak_pss / 1e6, 1),
                "start_pss_mb": round(self.start_pss / 1e6, 1), "peak_processes": self.peak_procs}

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_rss = self.peak_pss = 0
        self.poll(pss=True)


@dataclass
class Measurement:
    """Timed windows of one stream."""

    img_s: List[float] = field(default_factory=list)
    mb_s: List[float] = field(default_factory=list)
    cpu_percent: List[float] = field(default_factory=list)
    images: int = 0

    def summary(self) -> dict:
        return {
            "img_s": statistics.median(self.img_s),
            "img_s_repeats": [round(v, 2) for v in self.img_s],
            "mb_s": statistics.median(self.mb_s) if any(self.mb_s) else None,
            "cpu_percent": statistics.median(self.cpu_percent),
            "timed_images": self.images,
        }


def measure_stream(stream: Stream, monitor: TreeMonitor, *, warmup: int, batches: int, repeats: int) -> Measurement:
    """``warmup`` batches untimed, then ``repeats`` windows of ``batches`` batches; img/s per window.

    CPU % is CPU seconds of the whole process tree per wall second in the window (100 = one core).
    """
    it = stream.batches
    for _ in range(warmup):
        next(it)
    stream.sync()
    m = Measurement()
    for _ in range(repeats):
        cpu0 = monitor.poll()
        t0 = time.perf_counter()
        n = nbytes = 0
        for _ in range(batches):
            k, b = next(it)
            n += k
            nbytes += b
        stream.sync()
        dt = time.perf_counter() - t0
        cpu1 = monitor.poll()
        m.img_s.append(n / dt)
        m.mb_s.append(nbytes / dt / 1e6)
        m.cpu_percent.append(100.0 * (cpu1 - cpu0) / dt)
        m.images += n
    return m
