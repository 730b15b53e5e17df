"""deepfake-pack --faces --ray on 1 and then 2 Ray nodes of one CPU each, in one run: files/s, frames/s, speed-up.

    PYTHONPATH=$PWD python docs/experiments/ray_scaling.py --videos ../shared/data/ffpp-dev --frames 8

A `ray.cluster_utils.Cluster` on this machine: a head node with one CPU; the pack runs on it; a second
one-CPU node joins; the pack runs again. Before each timed run an untimed warm-up pack (4 files, 1 frame)
starts the node's worker processes (imports of OpenCV, PyAV, the detector), so the timed runs compare the
work itself; the driver stays connected throughout (the pack uses the Ray this process joined). The two
outputs must be byte-identical (checked). Wall time includes the driver's planning and the manifest.
"busy CPUs" is the Ray workers' CPU seconds per wall second: on a quiet machine it is ~1 and ~2; on a loaded
one it shows how much CPU the run actually got, which bounds the speed-up.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from shard_tools.pack import main as pack_main  # noqa: E402

logger = logging.getLogger("ray_scaling")
NODE = {"num_cpus": 1, "object_store_memory": 128 * 2**20}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--videos", default=str(REPO.parent / "shared" / "data" / "ffpp-dev"),
                   help="folder with real/ and fake/ video folders")
    p.add_argument("--frames", type=int, default=8, help="frames sampled per video (--frames of the pack)")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p


def _pack(root: Path, out: Path, frames: int, address: str) -> float:
    t0 = time.perf_counter()
    rc = pack_main(["--real", str(root / "real"), "--fake", str(root / "fake"), "--out", str(out), "--faces",
                    "--frames", str(frames), "--group-by", "ffpp", "--ray", address])
    if rc != 0:
        raise SystemExit(f"deepfake-pack exited {rc}")
    return time.perf_counter() - t0


def _warm_up(videos: Path, tmp: Path, address: str, tag: str) -> None:
    """4 files, 1 frame: every node's worker process starts and imports before the timed run."""
    few = tmp / f"warm-{tag}"
    for label in ("real", "fake"):
        (few / label).mkdir(parents=True)
        for p in sorted((videos / label).iterdir())[:2]:
            os.symlink(p.resolve(), few / label / p.name)
    _pack(few, tmp / f"warm-{tag}-out", 1, address)


def _worker_cpu_s() -> float:
    """CPU seconds so far of this process's Ray worker processes (titled ``ray::...``; they live as long as the
    driver stays connected, so a difference over a run is that run's task work)."""
    import psutil

    total = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("ray::") and "DashboardAgent" not in " ".join(p.cmdline()):
                t = p.cpu_times()
                total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def _row(nodes: int, seconds: float, cpu_s: float, out: Path) -> dict:
    counts = json.loads((out / "manifest.json").read_text())["faces"]["counts"]
    files = sum(c["files"] for c in counts.values())
    frames = sum(c["frames"] for c in counts.values())
    return {"nodes": nodes, "cpus_per_node": 1, "files": files, "frames": frames, "seconds": round(seconds, 2),
            "files_per_s": round(files / seconds, 3), "frames_per_s": round(frames / seconds, 2),
            "worker_cpu_s": round(cpu_s, 1), "busy_cpus": round(cpu_s / seconds, 2)}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    args = get_args_parser().parse_args(argv)
    import ray
    from ray.cluster_utils import Cluster

    videos = Path(args.videos).resolve()
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # a shared machine near Ray's 95 % memory line
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    rows = []
    try:
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        with tempfile.TemporaryDirectory(prefix="ray-scaling-") as tmp:
            tmp = Path(tmp)
            for nodes in (1, 2):
                if nodes == 2:
                    cluster.add_node(**NODE)
                    cluster.wait_for_nodes()
                _warm_up(videos, tmp, cluster.address, str(nodes))
                load, cpu0 = os.getloadavg()[0], _worker_cpu_s()
                seconds = _pack(videos, tmp / f"out{nodes}", args.frames, cluster.address)
                cpu_s = _worker_cpu_s() - cpu0
                rows.append({**_row(nodes, seconds, cpu_s, tmp / f"out{nodes}"), "load_1min_before": round(load, 2)})
            same = all((tmp / "out1" / p.name).read_bytes() == p.read_bytes() for p in (tmp / "out2").glob("*.tar"))
    finally:
        ray.shutdown()
        cluster.shutdown()
    speedup = rows[0]["seconds"] / rows[1]["seconds"]
    logger.info("| nodes x CPUs | files | frames | seconds | files/s | frames/s | worker CPU s | busy CPUs | load before |")
    logger.info("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        logger.info("| %d x 1 | %d | %d | %.1f | %.2f | %.1f | %.1f | %.2f | %.1f |", r["nodes"], r["files"], r["frames"],
                    r["seconds"], r["files_per_s"], r["frames_per_s"], r["worker_cpu_s"], r["busy_cpus"],
                    r["load_1min_before"])
    logger.info("2 nodes / 1 node: %.2fx; outputs byte-identical: %s", speedup, same)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "speedup": speedup, "identical": same}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
