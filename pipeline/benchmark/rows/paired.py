"""A loader and its work limit measured in turns, in one process: the ratio a shared machine allows.

On a shared machine the speed of the cores drifts by 20% or more from one minute to the next (other
jobs, the host), so a loader row and its work-limit row measured a minute apart can disagree by that
much whatever the loader does. Here, inside the loader row's process, windows of the work limit
(`pipeline.benchmark.rows.limits`, the same pool of ``--workers`` processes) and of the loader
alternate, ``--paired-repeats`` times; each pair gives one ratio, and the row reports their median.

Each side is quiet while the other is timed: the pool finishes its tasks (untimed) before a loader
window; the loader's workers finish the batches DataLoader had asked for (the tree's CPU time stops
growing) before a limit window, and the loader window skips, untimed, the batches they prefetched.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import statistics
import time
from typing import Iterator, List, Tuple

from pipeline.benchmark.harness import TreeMonitor
from pipeline.benchmark.rows.common import load_shard_images, shard_paths
from pipeline.benchmark.rows.limits import _work_batch, _work_init


def wait_idle(monitor: TreeMonitor, *, step: float = 0.05, idle_cpu: float = 0.005, timeout: float = 10.0) -> None:
    """Until the process tree uses less than ``idle_cpu`` CPU seconds in ``step`` seconds."""
    end = time.perf_counter() + timeout
    last = monitor.poll()
    while time.perf_counter() < end:
        time.sleep(step)
        now = monitor.poll()
        if now - last < idle_cpu:
            return
        last = now


def _limit_window(pool, batches: int, batch: int, workers: int, start: int) -> Tuple[float, int]:
    """img/s of ``batches`` work-limit batches, 2 per worker in flight; all tasks done when it returns."""
    pending: collections.deque = collections.deque()
    t0 = time.perf_counter()
    n = submitted = 0
    while n < batches * batch:
        while len(pending) < 2 * workers and submitted < batches:
            pending.append(pool.apply_async(_work_batch, (start + submitted * batch, batch)))
            submitted += 1
        n += pending.popleft().get()
    return n / (time.perf_counter() - t0), start + submitted * batch


def loader_window(batches: Iterator[Tuple[int, int]], count: int, skip: int,
                  monitor: TreeMonitor) -> Tuple[float, float]:
    """img/s and CPU % of ``count`` loader batches, after ``skip`` untimed ones."""
    for _ in range(skip):  # made while the limit ran or before: not this window's work
        next(batches)
    cpu0, t0 = monitor.poll(), time.perf_counter()
    n = sum(next(batches)[0] for _ in range(count))
    dt = time.perf_counter() - t0
    return n / dt, 100.0 * (monitor.poll() - cpu0) / dt


def paired_ratio(params: dict, monitor: TreeMonitor, batches: Iterator[Tuple[int, int]], *, train: bool) -> dict:
    """Alternate work-limit and loader windows; the fields the loader row gets (``vs_work_limit_paired``
    is the median of the per-pair ratios)."""
    workers, batch, size = max(1, params["workers"]), params["batch_size"], params["image_size"]
    blobs = [data for _, data in load_shard_images(shard_paths(params), params["decode_samples"])]
    pool = mp.get_context().Pool(workers, initializer=_work_init, initargs=(blobs, size, batch, train, params["seed"]))
    limits: List[float] = []
    loaders: List[float] = []
    cpus: List[float] = []  # CPU % of the tree in each window, limit and loader in turn
    try:
        _limit_window(pool, 2, batch, workers, 0)  # the pool's start-up, untimed
        start = 0
        for _ in range(params["paired_repeats"]):
            wait_idle(monitor)
            cpu0, t0 = monitor.poll(), time.perf_counter()
            rate, start = _limit_window(pool, params["batches"], batch, workers, start)
            cpus.append(100.0 * (monitor.poll() - cpu0) / (time.perf_counter() - t0))
            limits.append(rate)
            wait_idle(monitor)  # each window starts from the same quiet machine
            rate, cpu = loader_window(batches, params["batches"], skip=2 * workers, monitor=monitor)
            loaders.append(rate)
            cpus.append(cpu)
    finally:
        pool.terminate()
        pool.join()
    ratios = [a / b for a, b in zip(loaders, limits)]
    return {"paired_img_s": [round(v, 2) for v in loaders], "paired_work_limit_img_s": [round(v, 2) for v in limits],
            "vs_work_limit_paired": round(statistics.median(ratios), 3),
            "paired_ratios": [round(r, 3) for r in ratios], "paired_cpu_percent": [round(c) for c in cpus]}
