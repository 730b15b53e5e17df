"""The whole pipeline in one command, on CPU, in a few minutes, with no data of your own.

    deepfake-demo --out runs/demo                      # synthetic sample data (see sample_data.py)
    deepfake-demo --out runs/demo --real R --fake F    # the same stages on your own folders

Stages (the same code the CLIs run): sample data -> pack -> inspect --verify --grid -> train
(2 CPU processes under `accelerate launch`, or 1 with --processes 1) -> evaluate -> predict ->
bench (short). Ends with a summary table and the paths of the PNGs it wrote.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: repo root on sys.path, this file's folder off it (else shard_tools/
    _here = os.path.dirname(os.path.abspath(__file__))  # inspect.py would shadow the stdlib's inspect, and so on)
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import json
import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import List, Optional

logger = logging.getLogger("pipeline.demo")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run pack -> inspect -> train -> evaluate -> predict -> bench end to end on CPU.",
        add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--out", default="runs/demo", help="folder for everything the demo writes")
    g.add_argument("--real", nargs="+", default=None, help="your own folder(s) of real images (default: synthetic sample data)")
    g.add_argument("--fake", nargs="+", default=None, help="your own folder(s) of fake images (default: synthetic sample data)")
    g.add_argument("--n-per-class", type=int, default=1000, help="synthetic images per class")
    g.add_argument("--sample-size", type=int, default=96, help="side in pixels of the synthetic images")
    g = p.add_argument_group("train")
    g.add_argument("--model", default="deepfakenet_tiny", help="model name (see model.list_models())")
    g.add_argument("--image-size", type=int, default=64, help="training/eval input size in pixels")
    g.add_argument("--epochs", type=int, default=12, help="training epochs")
    g.add_argument("--batch-size", type=int, default=32, help="batch size per process")
    g.add_argument("--backend", default="torch", choices=["torch", "dali"], help="loader backend")
    g.add_argument("--processes", type=int, default=2, choices=[1, 2],
                   help="training processes: 2 runs real DDP over gloo under `accelerate launch`")
    g.add_argument("--workers", type=int, default=1, help="loader workers per process")
    g = p.add_argument_group("run")
    g.add_argument("--quick", action="store_true", help="tiny everything (for tests): 40 images per class, 1 epoch")
    g.add_argument("--seed", type=int, default=0, help="seed for data, split and training")
    g.add_argument("--skip-bench", action="store_true", help="skip the short loader benchmark")
    return p


def _run_stage(name: str, fn, argv: List[str]) -> float:
    logger.info("== %s: %s", name, " ".join(argv))
    t0 = time.perf_counter()
    rc = fn(argv)
    if rc not in (0, None):
        raise SystemExit(f"demo: stage {name!r} failed with exit code {rc}")
    return time.perf_counter() - t0


def _train_multiprocess(train_argv: List[str], processes: int) -> None:
    """Start pipeline/train.py in ``processes`` CPU processes (real DDP over gloo)."""
    script = str(Path(__file__).resolve().parent / "train.py")
    if processes == 1:
        cmd = [sys.executable, script, "--cpu", *train_argv]
    else:
        # `accelerate launch --cpu --num_processes 2` starts ONE process; --multi_gpu with
        # ACCELERATE_USE_CPU starts two CPU processes over gloo.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script, "--cpu", *train_argv]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    logger.info("== train: %s", " ".join(cmd))
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        raise SystemExit(f"demo: stage 'train' failed with exit code {rc}")


def _summary_rows(shards: Path, run: Path, ev: Path, bench_json: Path) -> List[tuple]:
    """(name, value) rows of the demo's closing table, read back from what each stage wrote."""
    manifest = json.loads((shards / "manifest.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    m = json.loads((ev / "metrics.json").read_text())["metrics"]
    rows = [
        ("train samples", manifest["splits"]["train"]["num_samples"]),
        ("val samples", manifest["splits"]["val"]["num_samples"]),
        ("skipped files", len(manifest.get("skipped", []))),
        ("duplicates dropped", sum(len(d["dropped"]) for d in manifest.get("duplicates", []))),
        ("train processes", f"{summary['num_processes']} ({summary['distributed_type']})"),
        ("train img/s (mean over epochs)", f"{summary['mean_img_s']:.0f}"),
        ("val ROC AUC", f"{m['roc_auc']:.3f}"),
        ("val accuracy @0.5", f"{m['accuracy']:.3f}"),
        ("val EER", f"{m['eer']:.3f}"),
    ]
    if bench_json.exists():
        b = json.loads(bench_json.read_text())["summary"]
        if b.get("best_train_loader"):
            rows.append(("bench: best train loader", f"{b['best_train_loader']}: {b['best_train_loader_img_s']:.0f} img/s "
                         f"({b['best_vs_decode']:.2f}x the decode-only limit)"))
    return rows


def _inputs(args: argparse.Namespace, out: Path, times: dict) -> tuple:
    """The real and fake input folders: the user's, or synthetic sample data made under ``out``."""
    if args.real is not None:
        return args.real, args.fake
    from pipeline.data.synthetic import make_sample_data

    t0 = time.perf_counter()
    real_dir, fake_dir = make_sample_data(out / "data", args.n_per_class, args.sample_size, args.seed)
    times["sample data"] = time.perf_counter() - t0
    return [str(real_dir)], [str(fake_dir)]


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if (args.real is None) != (args.fake is None):
        raise SystemExit("demo: give both --real and --fake, or neither (synthetic sample data)")
    if args.quick:
        args.n_per_class, args.sample_size, args.epochs, args.image_size, args.batch_size = 40, 64, 1, 32, 8

    from pipeline import bench, evaluate, predict
    from shard_tools import inspect as inspect_cli
    from shard_tools import pack

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    t_start = time.perf_counter()
    real, fake = _inputs(args, out, times)

    shards, run, ev = out / "shards", out / "run", out / "eval"
    for d in (shards, run, ev):  # the demo always starts its stages fresh
        shutil.rmtree(d, ignore_errors=True)
    times["pack"] = _run_stage("pack", pack.main, ["--real", *real, "--fake", *fake, "--out", str(shards),
                                                   "--workers", "2", "--shard-size", "100", "--min-shards", "4",
                                                   "--seed", str(args.seed), "--min-size", "32"])
    sheet = out / "contact_sheet.png"
    times["inspect"] = _run_stage("inspect", inspect_cli.main, [str(shards), "--verify", "--grid", str(sheet), "--n", "32"])

    t0 = time.perf_counter()
    _train_multiprocess(["--data", str(shards), "--out", str(run), "--model", args.model,
                         "--image-size", str(args.image_size), "--epochs", str(args.epochs),
                         "--batch-size", str(args.batch_size), "--backend", args.backend,
                         "--workers", str(args.workers), "--seed", str(args.seed)], args.processes)
    times["train"] = time.perf_counter() - t0

    times["evaluate"] = _run_stage("evaluate", evaluate.main, ["--checkpoint", str(run), "--data", str(shards),
                                                               "--out", str(ev), "--backend", args.backend,
                                                               "--device", "cpu"])
    few = sorted(p for d in (real[0], fake[0]) for p in Path(d).iterdir() if p.is_file())[:3]
    few += sorted(p for p in Path(fake[0]).iterdir() if p.is_file())[:3]
    preds = out / "predictions.csv"
    times["predict"] = _run_stage("predict", predict.main, ["--checkpoint", str(run), *map(str, few), "--out", str(preds)])
    bench_json, bench_png = out / "bench.json", out / "bench.png"
    if not args.skip_bench:
        times["bench"] = _run_stage("bench", bench.main, [
            "--data", str(shards), "--split", "train", "--backends", args.backend, "--batch-size", str(args.batch_size),
            "--image-size", str(args.image_size), "--warmup", "2", "--batches", "8", "--repeats", "1",
            "--workers", "2", "--rows", "read,decode,loaders", "--device", "cpu", "--json", str(bench_json), "--plot", str(bench_png)])

    rows = _summary_rows(shards, run, ev, bench_json)
    rows += [(f"time: {k}", f"{v:.1f} s") for k, v in times.items()]
    rows.append(("time: total", f"{time.perf_counter() - t_start:.1f} s"))
    width = max(len(k) for k, _ in rows)
    logger.info("\nDemo summary\n%s", "\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    pngs = [sheet, run / "curves.png", ev / "roc.png", bench_png]
    logger.info("PNGs written:\n%s", "\n".join(f"  {p}" for p in pngs if p.exists()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
