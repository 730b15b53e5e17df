"""Measurement harness of `pipeline.bench`: one fresh process per row, warm-up, timed windows, memory.

Each row runs in its own spawned process (`run_row`), so its peak resident memory is its own and
not what earlier rows left in the allocator. Inside that process `TreeMonitor` samples the RSS and
CPU time of the process and all its descendants (DataLoader / DALI / pool workers) in a background
thread; `measure_stream` pulls batches from a row's stream: ``warmup`` batches, then ``repeats``
timed windows of ``batches`` batches each.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import statistics
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

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


def _child(kind: str, params: dict, conn, start_method: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # a spawned process defaults to spawning its own children; give the row's DataLoader / pool
    # workers the start method they would get in a normal run of this program
    mp.set_start_method(start_method, force=True)
    try:
        from pipeline.bench_rows import get_row_fn

        fn = get_row_fn(kind)
        with TreeMonitor() as monitor:
            rows = fn(params, monitor)
        conn.send(("ok", rows))
    except SkipRow as e:
        conn.send(("skipped", str(e)))
    except BaseException as e:  # reported as a failed row, the run goes on
        detail = traceback.format_exc(limit=-3)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        conn.send(("failed", f"{type(e).__name__}: {msg}"[:300], detail))
    finally:
        conn.close()


def run_row(kind: str, params: dict, *, timeout: float) -> Tuple[str, object, Optional[str]]:
    """Run one row in a fresh spawned process; return ``(status, rows_or_reason, detail)``.

    ``status`` is ``ok`` (a list of row dicts), ``skipped`` or ``failed`` (a one-line reason).
    A child that hangs past ``timeout`` seconds is killed with its workers and reported as failed.
    """
    start_method = mp.get_start_method()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(kind, params, child, start_method), name=f"bench-{kind}")
    proc.start()
    child.close()
    try:
        if parent.poll(timeout):
            msg = parent.recv()
            proc.join(30)
        else:
            msg = ("failed", f"timed out after {timeout:.0f} s (--row-timeout)", None)
    except EOFError:
        proc.join(5)
        msg = ("failed", f"row process died (exit code {proc.exitcode})", None)
    finally:
        if proc.is_alive():
            _kill_tree(proc.pid)
        proc.join(10)
        parent.close()
    status, payload = msg[0], msg[1]
    detail = msg[2] if len(msg) > 2 else None
    return status, payload, detail


def _kill_tree(pid: int) -> None:
    """End a row process and any workers it left behind (only the descendants of ``pid``)."""
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
