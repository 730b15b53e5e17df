"""`deepfake-bench`: loader throughput with its limits and baselines, all rows in one run.

Rows, measured on the same images side by side, each in a fresh process (so peak memory is the
row's own): (1) read only: raw tar streaming; (2) decode-only limit: libjpeg-turbo decode of the
shard JPEGs in --workers processes (and nvJPEG on cuda); (2b) the train and eval work limits: the
least work each loader must do (decode, resize or augment, float output) in --workers processes;
(3) the original project's per-file cv2 + float v2 loader; (4) naive webdataset + PIL +
per-sample transforms; (5) each `build_loader` backend, train (aug ``seed``) and eval (``none``);
(6) data stall: training steps fed by the best loader vs synthetic tensors; (7) the packer on the
folders (25% and 100% of the files) beside decode-only on the same files. Each row: img/s (median
of --repeats timed windows after --warmup batches), ratios to the decode-only limit, to the
original baseline and (loaders) to their own work limit, peak RSS of the process tree, CPU %.

    python pipeline/bench.py --data PACK_OUT --images-real DIR --images-fake DIR --json bench.json --plot bench.png
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: repo root on sys.path, this file's folder off it (else shard_tools/
    _here = os.path.dirname(os.path.abspath(__file__))  # inspect.py would shadow the stdlib's inspect, and so on)
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import datetime
import logging
import platform
from pathlib import Path
from typing import List, Optional

from tqdm import tqdm

from pipeline.benchmark.report import add_ratios, plot, table
from pipeline.benchmark.runner import run_row
from shard_tools.fsutil import atomic_write_json
from shard_tools.storage import option_names, parse_storage_options, redacted

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
ROW_GROUPS = ("read", "decode", "original", "wds", "limits", "loaders", "self_blend", "memory", "remote", "stall",
              "pack", "faces")
BACKENDS = ("dali", "torch")
DECODES = ("auto", "cpu", "gpu")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _csv(choices):
    def parse(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose a comma-separated subset of {', '.join(choices)}")
        return items
    return parse


def _positive(name: str, minimum: int = 1):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r}: expected an integer >= {minimum}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{name} {v}: must be >= {minimum}")
        return v
    return parse


def _probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--self-blend {text!r}: expected a probability") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"--self-blend {v}: expected a probability in (0, 1]")
    return v


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepfake-bench", add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Loader throughput benchmark: read-only, decode-only and work limits, the original project's "
                    "loader, naive webdataset, each build_loader backend (and self-blending), data stall and "
                    "pack throughput, measured in one run on the same images.")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="pack output folder (with manifest.json) or a shard pattern")
    g.add_argument("--split", default="train", help="split of --data to read")
    g.add_argument("--images-real", default=None, help="folder of real images that was packed (rows 3 and 7)")
    g.add_argument("--images-fake", default=None, help="folder of fake images that was packed (rows 3 and 7)")
    g = p.add_argument_group("loaders")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device of the loader and "
                   "model rows; auto = cuda when available")
    g.add_argument("--backends", type=_csv(BACKENDS), default=list(BACKENDS),
                   help=f"build_loader backends to time, comma-separated from {','.join(BACKENDS)}")
    g.add_argument("--decode", type=_csv(DECODES), default=["auto"],
                   help="where the torch backend decodes, comma-separated from auto,cpu,gpu (gpu: nvJPEG, CUDA only; "
                        "auto = gpu on cuda): one set of torch loader rows per entry")
    g.add_argument("--batch-size", type=_positive("--batch-size"), default=64, help="images per batch in every row")
    g.add_argument("--image-size", type=_positive("--image-size", 8), default=224, help="output side in pixels")
    g.add_argument("--workers", type=_positive("--workers", 0), default=_cpus(),
                   help="worker processes of every loader, of decode-only and of the packer")
    g.add_argument("--decode-samples", type=_positive("--decode-samples"), default=2048,
                   help="encoded images held in memory and cycled by the decode-only row")
    g.add_argument("--seed", type=int, default=0, help="seed of shuffling and augmentation")
    g.add_argument("--self-blend", type=_probability, default=0.5, metavar="P", help="self-blending probability "
                   "of row 9b (the torch train loader with it, in turns with the same loader without it: row 9)")
    g.add_argument("--remote-data", default=None, metavar="URL",
                   help="the same pack output at a URL (s3://..., https://...): the remote rows train-load it "
                        "streamed and through a verified cache, --memory-epochs whole epochs each, next to --data")
    g.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec options for --remote-data")
    g = p.add_argument_group("timing")
    g.add_argument("--rows", type=_csv(ROW_GROUPS), default=list(ROW_GROUPS),
                   help=f"row groups to run, comma-separated from {','.join(ROW_GROUPS)}")
    g.add_argument("--warmup", type=_positive("--warmup", 0), default=20, help="untimed batches before timing")
    g.add_argument("--batches", type=_positive("--batches"), default=100, help="batches per timed window")
    g.add_argument("--repeats", type=_positive("--repeats"), default=3, help="timed windows per row; the median is reported")
    g.add_argument("--paired-repeats", type=_positive("--paired-repeats", 0), default=3,
                   help="on cpu, each loader row then also runs its work limit and itself in turns, this many pairs of "
                        "--batches windows (the ratio a machine whose speed drifts allows); 0 = off")
    g.add_argument("--row-timeout", type=_positive("--row-timeout"), default=900,
                   help="seconds after which a row's process is killed and the row reported as failed")
    g.add_argument("--memory-epochs", type=_positive("--memory-epochs"), default=3,
                   help="whole training epochs per backend in the memory row (PSS recorded at each epoch end)")
    _add_stall_pack_output(p)
    return p


def _add_stall_pack_output(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (data stall row)")
    g.add_argument("--model", default=None,
                   help="model of the stall row; default deepfakenet_tiny on cpu, deepfakenet_base on cuda")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="autocast of the stall row's steps; auto = bf16 on cuda, fp32 on cpu")
    g.add_argument("--model-threads", type=_positive("--model-threads", 0), default=0,
                   help="torch threads of the stall row's steps on cpu; 0 = the cores the --workers leave free (at least 1)")
    g.add_argument("--stall-warmup", type=_positive("--stall-warmup", 0), default=3, help="untimed burn-in steps")
    g.add_argument("--stall-steps", type=_positive("--stall-steps"), default=10, help="training steps per timed window")
    g = p.add_argument_group("packer row")
    g.add_argument("--pack-repeats", type=_positive("--pack-repeats"), default=1, help="pack runs per packer row")
    g.add_argument("--tmp-dir", default=None, help="where the packer row writes its temporary output")
    g = p.add_argument_group("face stage row (10)")
    g.add_argument("--media", default=None, metavar="DIR", help="a folder of videos (e.g. ../shared/data/ffpp-dev): row 10 "
                   "times the face stage on them, split into decode / detect / crop+encode+write, next to decode-only")
    g.add_argument("--media-frames", type=_positive("--media-frames"), default=32, metavar="K", help="frames per video")
    g = p.add_argument_group("output")
    g.add_argument("--json", default=None, help="write every row, the summary and the settings to this JSON file")
    g.add_argument("--plot", default=None, help="write a bar chart of img/s per row to this PNG file")


def plan_rows(args: argparse.Namespace) -> List[dict]:
    """The rows to run, in order: ``{kind, names, labels, group, extra params}``."""
    dev = args.device
    plan = []
    add = plan.append
    if "read" in args.rows:
        add(dict(kind="read", names=["read"], labels=["1 read only (tar stream)"], group="io"))
    if "decode" in args.rows:
        add(dict(kind="decode", names=["decode"], labels=["2 decode-only limit"], group="limit"))
        if dev == "cuda":
            add(dict(kind="decode_gpu", names=["decode_gpu"], labels=["2 decode-only, nvJPEG (cuda)"], group="limit"))
    if "original" in args.rows:
        add(dict(kind="original", names=["original"], labels=["3 original project (folders)"], group="baseline"))
    if "wds" in args.rows:
        add(dict(kind="wds", names=["wds"], labels=["4 naive webdataset + PIL"], group="naive"))
    if "limits" in args.rows:  # right before the loader rows: measured as close in time as can be
        add(dict(kind="limit_train", names=["limit_train"], labels=["2b train work limit (decode+aug+float)"],
                 group="limit", extra=dict(train=True)))
        add(dict(kind="limit_eval", names=["limit_eval"], labels=["2b eval work limit (decode+resize+float)"],
                 group="limit", extra=dict(train=False)))
    if "loaders" in args.rows:
        for backend, decode, tag in _loader_variants(args):
            for train in (True, False):
                mode = "train aug=seed" if train else "eval aug=none"
                add(dict(kind="loader", names=[f"{backend}_{'train' if train else 'eval'}{tag}"],
                         labels=[f"5 {backend} {mode}{tag.replace('_', ' ')} ({dev})"], group="loader",
                         extra=dict(backend=backend, train=train, decode=decode)))
    if "self_blend" in args.rows and "torch" in args.backends:
        add(dict(kind="self_blend", names=["sbi_off", "sbi_on"],
                 labels=[f"9 torch train aug=seed ({dev}), in turns with 9b",
                         f"9b same, --self-blend {args.self_blend} ({dev})"], group="self_blend"))
    if "memory" in args.rows:
        for backend, decode, tag in _loader_variants(args):
            add(dict(kind="epochs", names=[f"{backend}_epochs{tag}"],
                     labels=[f"5b {backend} {args.memory_epochs} epochs, memory{tag.replace('_', ' ')} ({dev})"],
                     group="memory", extra=dict(backend=backend, decode=decode)))
    if "remote" in args.rows and args.remote_data:  # only with a URL to compare against
        add(dict(kind="remote", names=["remote_local", "remote_stream", "remote_cache"],
                 labels=[f"8 torch train, {args.memory_epochs} epochs: local pack", "8 same, from the URL, streamed",
                         "8 same, from the URL, cached"], group="remote"))
    if "stall" in args.rows:
        add(dict(kind="stall", names=["stall_synthetic", "stall_fed"],
                 labels=[f"6 {args.model} steps, synthetic ({dev})", f"6 {args.model} steps, fed by loader ({dev})"],
                 group="stall"))
    if "pack" in args.rows:
        add(dict(kind="pack", names=["pack_25"], labels=["7 pack, 25% of files"], group="pack",
                 extra=dict(pack_fraction=0.25)))
        add(dict(kind="pack", names=["pack_100"], labels=["7 pack, all files"], group="pack",
                 extra=dict(pack_fraction=1.0)))
        add(dict(kind="decode_files", names=["decode_files"], labels=["7 decode-only, same files"], group="pack"))
    if "faces" in args.rows and args.media:  # only with videos to time
        add(dict(kind="faces", names=["faces_stage", "faces_decode_only"],
                 labels=["10 face stage, 1 process (frames/s)", "10 decode-only, same frames"], group="faces"))
    return plan


def _loader_variants(args: argparse.Namespace) -> List[tuple]:
    """``(backend, decode, name tag)`` of the loader rows: the torch backend once per --decode entry
    (tagged ``_decode_X`` when there are several), DALI once (it decodes where it decodes)."""
    out = []
    for backend in args.backends:
        decodes = args.decode if backend == "torch" else ["auto"]
        for decode in decodes:
            out.append((backend, decode, f"_decode_{decode}" if len(decodes) > 1 else ""))
    return out


def precheck(spec: dict, args: argparse.Namespace) -> Optional[str]:
    """Why a row cannot run here (checked before starting its process), or None."""
    if spec["kind"] in ("original", "pack", "decode_files") and not args.images_real:
        return "needs --images-real and --images-fake (the image folders that were packed)"
    if spec["kind"] in ("loader", "epochs", "stall", "decode_gpu") and args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "--device cuda but CUDA is not available here"
    if spec.get("extra", {}).get("decode") == "gpu" and args.device != "cuda":
        return "--decode gpu needs --device cuda (nvJPEG)"
    return None


def _machine(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": _cpus(),
            "torch": torch.__version__, "device": device}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _settle_args(args: argparse.Namespace) -> Optional[str]:
    """Fill the ``auto`` defaults in place; the one-line error for a bad combination, else None."""
    from pipeline.scoring.cli import default_device

    if args.device == "auto":
        args.device = default_device()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: CUDA is not available on this machine; use --device cpu (or auto)"
    try:
        parse_storage_options(args.storage_options)
    except ValueError as e:
        return str(e)
    if args.storage_options and not args.remote_data:
        return "--storage-options is for --remote-data (a URL); give both or neither"
    args.model = args.model or ("deepfakenet_base" if args.device == "cuda" else "deepfakenet_tiny")
    if "stall" in args.rows:
        from model import list_models

        if args.model not in list_models():
            return f"--model {args.model!r}: choose one of {', '.join(list_models())}"
    if args.model_threads == 0:
        args.model_threads = max(1, _cpus() - args.workers)
    if args.precision == "auto":
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    if bool(args.images_real) != bool(args.images_fake):
        return "--images-real and --images-fake go together: give both folders or neither"
    for flag, folder in (("--images-real", args.images_real), ("--images-fake", args.images_fake)):
        if folder and not Path(folder).is_dir():
            return f"{flag} {folder}: not a folder"
    return None


def _run_rows(args: argparse.Namespace, base: dict) -> List[dict]:
    """Every planned row, each in a fresh process (`run_row`), in plan order."""
    rows: List[dict] = []
    for spec in tqdm(plan_rows(args), desc="bench rows", unit="row"):
        params = {**base, **spec.get("extra", {})}
        if spec["kind"] == "stall":
            loaders = [r for r in rows if r.get("group") == "loader" and r.get("train") and r.get("status") == "ok"]
            best = max(loaders, key=lambda r: r["img_s"]) if loaders else {}
            params["stall_backend"], params["decode"] = best.get("backend"), best.get("decode", "auto")
        reason = precheck(spec, args)
        if not reason and spec["kind"] == "stall" and not params["stall_backend"]:
            reason = "no train loader row ran ok in this run (--rows loaders), so nothing can feed the model"
        if reason:
            status, payload, detail = "skipped", reason, None
        else:
            status, payload, detail = run_row(spec["kind"], params, timeout=args.row_timeout)
        results = payload if status == "ok" else [{"status": status, "reason": payload} for _ in spec["names"]]
        for name, label, res in zip(spec["names"], spec["labels"], results):
            rows.append({"name": name, "label": label, "group": spec["group"], **spec.get("extra", {}), **res})
        if status == "failed":
            logger.warning("row %s failed: %s%s", spec["names"][0], payload, f"\n{detail}" if detail else "")
        elif status == "skipped":
            logger.info("row %s skipped: %s", spec["names"][0], payload)
    return rows


def _write_outputs(args: argparse.Namespace, report: dict) -> None:
    if args.json:
        atomic_write_json(args.json, report)
        logger.info("wrote %s", args.json)
    if args.plot:
        title = (f"deepfake-bench: {args.device}, {report['machine']['cpus']} CPUs, batch {args.batch_size}, "
                 f"{args.image_size} px, {args.workers} workers")
        plot(report["rows"], Path(args.plot), title)
        logger.info("wrote %s", args.plot)


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from pipeline.data.shards import DataError, resolve_shards

    error = _settle_args(args)
    if error:
        logger.error("%s", error)
        return 2
    try:
        shards = resolve_shards(args.data, args.split)
        if args.remote_data:  # checked here, once: not inside each row (where the local row would fail with it)
            resolve_shards(args.remote_data, args.split, storage_options=parse_storage_options(args.storage_options))
    except DataError as e:
        logger.error("%s", e)
        return 2
    base = {k: v for k, v in vars(args).items() if k not in ("rows", "backends", "decode", "json", "plot")}
    logger.info("deepfake-bench: %d shard(s) of split %r, batch %d, %d px, %d workers, device %s",
                len(shards.shards), args.split, args.batch_size, args.image_size, args.workers, args.device)
    rows = _run_rows(args, base)
    summary = add_ratios(rows)
    logger.info("\n%s", table(rows))
    for key, value in summary.items():
        logger.info("%s: %s", key, value)
    report = {
        "tool": "deepfake-bench", "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": {**vars(args), "rows": args.rows, "backends": args.backends, "decode": args.decode,
                 "storage_options": option_names(args.storage_options), "remote_data": redacted(args.remote_data)},
        "machine": _machine(args.device),
        "data": {"split": args.split, "shards": len(shards.shards), "num_samples": shards.num_samples},
        "rows": rows, "summary": summary,
    }
    _write_outputs(args, report)
    failed = [r["name"] for r in rows if r["status"] == "failed"]
    if failed:
        logger.error("%d row(s) failed: %s", len(failed), ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
