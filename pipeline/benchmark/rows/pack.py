"""The packer row: `deepfake-pack` timed in its own process on a subset of the bench's images."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

from pipeline.benchmark.harness import SkipRow, TreeMonitor
from pipeline.benchmark.rows.common import MB, list_images


def _subset_dirs(items: List[Tuple[str, int]], fraction: float, root: Path) -> Tuple[Path, Path, int]:
    """Folders of symlinks to every k-th file of each class (k = 1 / fraction)."""
    step = max(1, round(1 / fraction))
    dirs = (root / "real", root / "fake")
    n = 0
    for label, folder in enumerate(dirs):
        folder.mkdir(parents=True)
        files = [p for p, lab in items if lab == label][::step]
        for i, path in enumerate(files):
            os.symlink(os.path.abspath(path), folder / f"{i:07d}{Path(path).suffix.lower()}")
        n += len(files)
    return dirs[0], dirs[1], n


def row_pack(params: dict, monitor: TreeMonitor) -> List[dict]:
    items = list_images(params)
    spec = importlib.util.find_spec("shard_tools.pack")  # found, not imported: it is an entry point
    if spec is None or not spec.origin:
        raise SkipRow("shard_tools.pack not available")
    # As a user runs it: its own process (interpreter start included), not a fork of this one,
    # which has torch loaded and the monitor thread running.
    pack_cmd = [sys.executable, str(Path(spec.origin).resolve())]
    fraction = params["pack_fraction"]
    workers = max(1, params["workers"])
    import statistics

    rates, mbs, cpus = [], [], []
    with tempfile.TemporaryDirectory(prefix="deepfake-bench-pack-", dir=params.get("tmp_dir")) as tmp:
        tmp = Path(tmp)
        if fraction < 1.0:
            real, fake, n = _subset_dirs(items, fraction, tmp / "input")
            nbytes = sum(os.path.getsize(p) for p in (real / f for f in os.listdir(real))) + \
                sum(os.path.getsize(p) for p in (fake / f for f in os.listdir(fake)))
        else:
            real, fake, n = Path(params["images_real"]), Path(params["images_fake"]), len(items)
            nbytes = sum(os.path.getsize(p) for p, _ in items)
        monitor.reset_peak()
        for r in range(params["pack_repeats"]):
            out = tmp / f"out{r}"
            cpu0 = monitor.poll()
            t0 = time.perf_counter()
            rc = subprocess.run(pack_cmd + ["--real", str(real), "--fake", str(fake), "--out", str(out),
                                            "--workers", str(workers)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
            if rc.returncode != 0:
                tail = rc.stderr.strip().splitlines()[-1:] or [""]
                raise RuntimeError(f"deepfake-pack exited {rc.returncode} on {real} / {fake}: {tail[0]}")
            dt = time.perf_counter() - t0
            cpus.append(100.0 * (monitor.poll() - cpu0) / dt)
            rates.append(n / dt)
            mbs.append(nbytes / dt / MB)
            shutil.rmtree(out)
    pct = round(100 * fraction)
    return [{
        "status": "ok", "processes": workers, "img_s": statistics.median(rates),
        "img_s_repeats": [round(v, 2) for v in rates], "mb_s": statistics.median(mbs),
        "cpu_percent": statistics.median(cpus), "timed_images": n * len(rates),
        **monitor.memory(),
        "files": n, "input_mb": round(nbytes / MB, 1), "pack_fraction": fraction,
        "note": f"shard_tools.pack on {pct}% of the folder files ({n}), --workers {workers}, "
                f"{params['pack_repeats']} run(s) of the CLI in its own process, into a temp dir",
        "memory": "must not grow with bytes packed: compare the peak RSS of the 25% and 100% rows",
    }]
