"""The loader rows: each `build_loader` backend for train and eval, and its memory over whole epochs."""
from __future__ import annotations

import time
from typing import List

import psutil
import torch

from pipeline.benchmark.harness import Stream, TreeMonitor
from pipeline.benchmark.rows.common import epochs, finish, open_loader


def row_loader(params: dict, monitor: TreeMonitor) -> List[dict]:
    backend, train = params["backend"], params["train"]
    aug = "seed" if train else "none"
    loader = open_loader(params, backend, train=train, aug=aug)
    device = torch.device(params["device"])
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    close = getattr(loader, "close", lambda: None)
    return finish(params, monitor, Stream(epochs(loader, set_epoch=True), sync=sync, close=close,
                                          processes=max(1, params["workers"])),
                  note=f"build_loader(backend={backend}, train={train}, aug={aug}{_decode(loader)}) on {device}, "
                       f"{params['workers']} workers",
                  memory="constant in dataset size: shard list + shuffle buffer")


# ---------------------------------------------------------------- 5b. memory over epochs
def row_epochs(params: dict, monitor: TreeMonitor) -> List[dict]:
    """Three whole training epochs of one backend; the tree's memory at the end of each.

    What a long run needs to know: does resident memory stay flat epoch after epoch (no cache,
    queue or per-sample state that grows with the number of samples seen)?
    """
    backend = params["backend"]
    loader = open_loader(params, backend, train=True, aug="seed")
    device = torch.device(params["device"])
    per_epoch_pss, per_epoch_rss, n, t0, cpu0 = [], [], 0, time.perf_counter(), monitor.poll()
    try:
        for epoch in range(params["memory_epochs"]):
            loader.set_epoch(epoch)
            for batch in loader:
                n += int(batch.images.shape[0])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            mem = monitor.memory()
            per_epoch_pss.append(_tree_mb(monitor, "pss"))
            per_epoch_rss.append(_tree_mb(monitor, "rss"))
    finally:
        getattr(loader, "close", lambda: None)()
    dt = time.perf_counter() - t0
    cpu = 100.0 * (monitor.poll() - cpu0) / dt
    growth = round(per_epoch_pss[-1] - per_epoch_pss[0], 1)
    return [{"status": "ok", "img_s": n / dt, "img_s_repeats": [round(n / dt, 2)], "mb_s": None, "cpu_percent": cpu,
             "timed_images": n, "processes": max(1, params["workers"]), **mem,
             "pss_per_epoch_mb": per_epoch_pss, "rss_per_epoch_mb": per_epoch_rss, "pss_growth_mb": growth,
             "note": f"{params['memory_epochs']} whole train epochs of build_loader(backend={backend}, aug=seed"
                     f"{_decode(loader)}) on "
                     f"{device}; PSS of the process tree at each epoch end: {per_epoch_pss} MB",
             "memory": f"PSS change from the first to the last epoch end: {growth:+.1f} MB"}]


def _decode(loader) -> str:
    """``, decode=X`` for the torch backend (where it decodes), nothing for DALI."""
    spec = getattr(loader, "spec", None)
    return f", decode={spec.decode}" if spec is not None and spec.backend == "torch" else ""


def _tree_mb(monitor: TreeMonitor, kind: str) -> float:
    """Current (not peak) PSS or RSS of the monitored process tree, in MB."""
    total = 0
    for p in [monitor.root] + monitor.root.children(recursive=True):
        try:
            info = p.memory_full_info() if kind == "pss" else p.memory_info()
            total += getattr(info, kind, info.rss)
        except psutil.Error:
            continue
    return round(total / 1e6, 1)
