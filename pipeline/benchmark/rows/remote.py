"""The object-storage rows (``--remote-data URL``): the torch train loader reading the same pack from a
URL, streamed and through a verified local cache, whole epoch by whole epoch, next to the same loader
on the local pack, in one process, one after the other: img/s per epoch, the ratio to local, and the
process tree's memory at each epoch end (it must stay flat)."""
from __future__ import annotations

import tempfile
import time
from typing import List, Optional

from pipeline.benchmark.harness import SkipRow, TreeMonitor
from pipeline.benchmark.rows.loaders import _tree_mb


def _epochs(params: dict, data: str, cache_dir: Optional[str], monitor: TreeMonitor) -> dict:
    from pipeline.data.contract import LoaderSpec
    from pipeline.data.loader import build_loader
    from shard_tools.storage import parse_storage_options

    spec = LoaderSpec(data, params["split"], train=True, backend="torch", device="cpu",
                      batch_size=params["batch_size"], image_size=params["image_size"], aug="seed",
                      seed=params["seed"], num_workers=params["workers"], cache_dir=cache_dir,
                      storage_options=parse_storage_options(params.get("storage_options")))
    loader = build_loader(spec)
    img_s, pss = [], []
    for epoch in range(params["memory_epochs"]):
        loader.set_epoch(epoch)
        n, t0 = 0, time.perf_counter()
        for batch in loader:
            n += int(batch.images.shape[0])
        img_s.append(round(n / (time.perf_counter() - t0), 1))
        pss.append(_tree_mb(monitor, "pss"))
    return {"img_s_per_epoch": img_s, "pss_per_epoch_mb": pss}


def row_remote(params: dict, monitor: TreeMonitor) -> List[dict]:
    url = params.get("remote_data")
    if not url:
        raise SkipRow("no --remote-data URL given")
    local = _epochs(params, params["data"], None, monitor)
    streamed = _epochs(params, url, None, monitor)
    with tempfile.TemporaryDirectory(prefix="deepfake-bench-cache-") as cache:
        cached = _epochs(params, url, cache, monitor)
    rows = []
    for name, r in (("local", local), ("stream", streamed), ("cache", cached)):
        ratio = [round(a / b, 3) for a, b in zip(r["img_s_per_epoch"], local["img_s_per_epoch"])]
        rows.append({"status": "ok", "img_s": r["img_s_per_epoch"][-1], "img_s_repeats": r["img_s_per_epoch"],
                     "vs_local_per_epoch": ratio, "pss_per_epoch_mb": r["pss_per_epoch_mb"],
                     "processes": max(1, params["workers"]),
                     "note": f"torch train loader (aug seed) from {'the local pack' if name == 'local' else url} "
                             f"({name}): img/s per whole epoch {r['img_s_per_epoch']}, vs local {ratio}",
                     "memory": f"PSS at each epoch end {r['pss_per_epoch_mb']} MB"})
    return rows
