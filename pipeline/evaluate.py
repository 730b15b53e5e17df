"""Evaluate a checkpoint on a pack output's split, or directly on folders of real and fake images.

    deepfake-evaluate --checkpoint runs/x --data shards/ --split val --out eval/
    deepfake-evaluate --checkpoint runs/x/best.safetensors --real R1 R2 --fake F1 --out eval/ --robustness

Model name and image size come from the checkpoint metadata. Writes into ``--out``:

* ``metrics.json``: counts per class, accuracy at ``--threshold`` and at the EER threshold, ROC AUC,
  average precision, EER, confusion matrix (`pipeline.scoring.metrics.binary_metrics`); per input folder
  when more than one folder is given (each folder's accuracy, and the AUC of that folder against
  all images of the other class); every skipped file with its reason.
* ``scores.csv`` (id, source, group, label, score, path_bytes_hex), ``roc.png``, ``scores.png``
  (histogram by class).
* for face-stage crops (a pack made with ``--faces``, or photos/videos scored through the face stage):
  ``video_metrics`` in metrics.json and ``video_scores.csv``, one row per photo/video (``--pool``).

Photos and videos given as ``--real/--fake`` (or ``--set``) go through the face stage the checkpoint was trained
with (`pipeline.scoring.media`), so a model is scored at its own framing; ``--faces off`` scores images whole.
* with ``--robustness``: ``robustness.json`` and ``robustness.png`` (`pipeline.augment.degrade`).
* with ``--set``: ``metrics.json`` and ``cross_source.png`` (the cross-source report) instead.
* with ``--errors N``: per set, a grid of the N most confident false positives and false negatives with
  their heat maps and names (``errors.png``, or ``errors-<set>.png`` per ``--set``), the same images in
  a TensorBoard event file in ``--out``, and an ``errors`` key in ``metrics.json`` listing them
  (`pipeline.scoring.errors`).

The files appear together after all the work, ``metrics.json`` last, or not at all (`OutputSet`): a
failed write (disk full, ...) leaves ``--out`` as it was, and an ``--out`` that cannot be a folder (or
lies inside an input) is refused before the checkpoint is even read. Paths that are not valid UTF-8
are written escaped, with their exact bytes in ``path_bytes_hex`` (`pipeline.scoring.outputs`). Exit
code 0, or 2 with one error line (bad flag, checkpoint, data or output).

How images are read: ``--data`` uses the training loaders (`pipeline.data.loader.build_loader`,
``train=False``, augmentation ``none``; padding repeats dropped by id). ``--real/--fake`` reads the
files directly (`pipeline.data.folders`: the packer's walk and decode rules, then the loaders' eval
preprocessing); unreadable files are skipped and listed, never fatal. ``--robustness`` degrades the
decoded image at its original resolution, before the eval resize; with ``--data`` it reads each
sample's image member straight from the local tar (`pipeline.data.folders.shard_items`) through that
same file path, and its clean reference is scored the same way (so it may differ from the loader's
scores by decoder rounding).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: repo root on sys.path, this file's folder off it (else shard_tools/
    _here = os.path.dirname(os.path.abspath(__file__))  # inspect.py would shadow the stdlib's inspect, and so on)
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import logging
from pathlib import Path
from typing import List, Optional, Sequence

from pipeline.augment.config import Norm
from pipeline.checkpoint import CheckpointError, load_checkpoint, norm_of
from pipeline.data.contract import BACKEND_CHOICES, DECODE_CHOICES, LoaderSpec
from pipeline.data.shards import DataError
from pipeline.scoring.cli import OneLineParser, add_scoring_arg, check_inference_args, default_device, scoring_mode
from pipeline.scoring.media import add_media_args, face_settings
from pipeline.scoring.errors import TB_EVENTS, ErrorSettings, error_outputs, png_for, stale_pngs
from pipeline.scoring.explain import ExplainError
from pipeline.scoring.explain_files import add_cam_args, check_gradients, explainer_from_args
from pipeline.scoring.metrics import plot_roc, plot_score_hist, quiet_metrics, to_jsonable
from pipeline.scoring.outputs import (OutputError, OutputSet, check_apart, check_output_dir, exit_on_out_of_memory, path_hex,
                                      showable, shown, writing)
from pipeline.scoring.report import parse_set
from pipeline.scoring.robustness import plot_robustness, run_sweep
from pipeline.scoring.score import (check_finite, per_group, score_folders, score_split, video_level,
                                    write_scores_csv)
from shard_tools.fsutil import atomic_write_json
from shard_tools.inputs import InputError
from shard_tools.storage import parse_storage_options

logger = logging.getLogger("pipeline.evaluate")
OUTPUTS = ("metrics.json", "scores.csv", "video_scores.csv", "roc.png", "scores.png", "robustness.json", "robustness.png",
           "cross_source.png",
           png_for(None), TB_EVENTS)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = OneLineParser(
        description="Score a trained checkpoint on shards or on image folders; write metrics, plots and scores.",
        add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint, or a run dir (uses RUN_DIR/best.safetensors)")
    g.add_argument("--device", default=default_device(), help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--threshold", type=float, default=0.5, help="P(fake) at or above which an image is called fake")
    g = p.add_argument_group("data (give --data, or --real and --fake)")
    g.add_argument("--data", default=None,
                   help="a deepfake-pack output to evaluate: a local folder, a URL (s3://..., https://..., any fsspec "
                        "URL; streamed), or a local shard pattern of one split")
    g.add_argument("--storage-options", default=None, metavar="JSON",
                   help='fsspec options for a --data URL, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'')
    g.add_argument("--cache-dir", default=None,
                   help="local folder to keep downloaded remote shards in (verified; DALI always downloads)")
    g.add_argument("--split", default="val", help="split of --data to evaluate")
    g.add_argument("--real", nargs="+", default=None, help="folder(s) or files of real images (read directly, recursive)")
    g.add_argument("--fake", nargs="+", default=None, help="folder(s) or files of fake images (read directly, recursive)")
    g.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="loader backend for --data: dali, torch, or auto (default: dali on CUDA when DALI is "
                        "installed, else torch)")
    g.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    g.add_argument("--decode", default="auto", choices=DECODE_CHOICES,
                   help="torch backend with --data: decode in the workers (cpu) or with nvJPEG on the GPU (gpu); "
                        "auto = gpu on CUDA, cpu otherwise")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding worker processes (0: in process)")
    add_scoring_arg(g)
    g.add_argument("--set", action="append", default=[], type=parse_set, metavar="NAME=REAL_DIR,FAKE_DIR",
                   help="a named set of real and fake folders for the cross-source report (repeatable; with --data "
                        "the split counts as one more set): metrics.json and cross_source.png list AUC, AP, EER and "
                        "accuracy per set and per scoring mode (all four, or the one --scoring names)")
    add_media_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="eval", help="folder for metrics.json, scores.csv and the plots")
    g.add_argument("--robustness", action="store_true",
                   help="also re-score after JPEG re-compression (q 95-30), downscale+upscale (0.75-0.25) and "
                        "Gaussian blur (sigma 0.5-3), applied at the original resolution: robustness.json/.png")
    g.add_argument("--errors", type=int, default=0, metavar="N",
                   help="per set, draw the N most confident false positives and N most confident false negatives "
                        "with class-activation heat maps: errors.png (errors-SET.png with --set), a TensorBoard event "
                        "file in --out, and an 'errors' key in metrics.json (0: off)")
    add_cam_args(g)
    return p


def check_disjoint(p: argparse.ArgumentParser, real: Sequence[str], fake: Sequence[str],
                   names: Sequence[str] = ("--real", "--fake")) -> None:
    """Refuse a real path that is a fake path, or inside one (or the other way round): its images would be
    scored as both classes. ``names`` are what the message calls the two (the flags, or a --set's parts)."""
    for r in real:
        for f in fake:
            a, b = os.path.realpath(r), os.path.realpath(f)
            if a == b:
                p.error(f"{names[0]} {r} and {names[1]} {f} are the same path: every image there would count as both classes")
            if os.path.commonpath([a, b]) in (a, b):
                p.error(f"{names[0]} {r} and {names[1]} {f} overlap (one is inside the other): the images they share "
                        "would count as both classes")


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        parse_storage_options(args.storage_options)
    except ValueError as e:
        p.error(str(e))
    check_inference_args(p, args)
    if args.errors < 0:
        p.error(f"--errors {args.errors}: must be >= 0 (0: off)")
    if args.set:
        if args.real or args.fake or args.robustness:
            p.error("--set makes the cross-source report: give sets (and optionally --data), not --real/--fake/--robustness")
        names = [name for name, _, _ in args.set]
        for name, real, fake in args.set:
            if names.count(name) > 1:
                p.error(f"--set {name}: that name is given {names.count(name)} times; give each set its own name")
            check_disjoint(p, real, fake, (f"--set {name}: its real folder", "its fake folder"))
        return
    if args.data is not None and (args.real or args.fake):
        p.error("give either --data, or --real and --fake, not both")
    if args.data is None and not (args.real and args.fake):
        p.error("give --data PACK_OUT, or both --real DIR [DIR ...] and --fake DIR [DIR ...]")
    if args.data is None:
        check_disjoint(p, args.real, args.fake)


def _inputs(args: argparse.Namespace) -> List[tuple]:
    """(flag, path) of every input, for `check_apart`."""
    folders = [("--data", args.data)] if args.data is not None else []
    folders += [("--real", r) for r in args.real or []] + [("--fake", f) for f in args.fake or []]
    return folders + [(f"--set {name}", d) for name, real, fake in args.set for d in real + fake]


def log_table(report: dict) -> None:
    m = report["metrics"]
    logger.info("evaluated %d images (%d real, %d fake), %d skipped", m["n"], m["n_real"], m["n_fake"], report["n_skipped"])
    for name, key in (("accuracy@%.2f" % m["threshold"], "accuracy"), ("accuracy@EER", "accuracy_at_eer"),
                      ("EER threshold", "eer_threshold"), ("ROC AUC", "roc_auc"), ("average precision", "average_precision"),
                      ("EER", "eer")):
        v = m.get(key)
        logger.info("  %-18s %s", name, "n/a" if v is None or v != v else f"{v:.4f}")
    (tn, fp), (fn, tp) = m["confusion_matrix"]
    logger.info("  confusion          real->real %d  real->fake %d  fake->real %d  fake->fake %d", tn, fp, fn, tp)
    v = report.get("video_metrics")
    if v is not None:
        logger.info("  per file (photo/video, %s of frames; a frame = max of its faces): %d files, ROC AUC %s, AP %s, "
                    "EER %s, accuracy %s", v["pool"], v["n_files"], *("n/a" if x is None or x != x else f"{x:.4f}" for x in
                                                                      (v["roc_auc"], v["average_precision"], v["eer"],
                                                                       v["accuracy"])))
    for row in report.get("per_folder", []):
        auc = row["roc_auc_vs_other_class"]
        logger.info("  %-40s %-4s n=%-6d acc=%.4f auc_vs_other=%s", shown(row["folder"])[-40:], row["label"], row["n"],
                    row["accuracy"], "n/a" if auc is None or auc != auc else f"{auc:.4f}")


def _spec(args: argparse.Namespace, size: int, norm: Norm) -> LoaderSpec:
    return LoaderSpec(args.data, args.split, train=False, backend=args.backend, device=args.device,
                      batch_size=args.batch_size, image_size=size, aug="none", num_workers=args.workers,
                      storage_options=parse_storage_options(args.storage_options), cache_dir=args.cache_dir,
                      decode=args.decode, norm=norm)


def _score(args: argparse.Namespace, model, meta: dict, mode: str, real=None, fake=None, need_items: bool = False):
    """(scores, items, skipped, inputs) of --data, or of the folders ``real``/``fake``, as the checkpoint
    (``meta``: image size, normalisation) says."""
    size, norm = int(meta["image_size"]), norm_of(meta)
    if real is None and args.data is not None:
        spec = _spec(args, size, norm)
        s, items = score_split(model, spec, mode, need_items=need_items)
        return s, items, [], {"data": str(args.data), "split": args.split, "backend": spec.backend}
    real, fake = real or args.real, fake or args.fake
    s, items, skipped = score_folders(model, real, fake, image_size=size, mode=mode, device=args.device,
                                      batch_size=args.batch_size, num_workers=args.workers, faces=args.face_settings,
                                      norm=norm)
    return s, items, skipped, {"real": list(real), "fake": list(fake)}


def _cross_source(args: argparse.Namespace, model, meta: dict) -> int:
    """--set: every set (and --data) under every scoring mode asked for: one table, one PNG."""
    from pipeline.scoring import report as cross
    from pipeline.scoring.modes import SCORING

    size = int(meta["image_size"])
    sets = ([(f"{Path(str(args.data)).name}:{args.split}", None, None)] if args.data else []) + list(args.set)
    rows, mistakes = [], []
    for mode in [args.scoring] if args.scoring else list(SCORING):
        for name, real, fake in sets:
            drawn = args.errors and mode == scoring_mode(args, meta)
            s, items, skipped, _ = _score(args, model, meta, mode, real, fake, need_items=bool(drawn))
            check_finite(s.scores, s.ids, meta["path"])
            _both_classes(s, skipped, f"--set {name}" if real else f"--data {shown(args.data)} ({args.split})")
            rows.append(cross.row(name, mode, s.labels, s.scores, args.threshold, len(skipped)))
            if s.has_faces:
                v = video_level(s, args.pool)
                rows.append(cross.row(f"{name} (video, {args.pool})", mode, v.labels, v.scores, args.threshold,
                                      len(skipped)))
            mistakes += [(name, s, items)] if drawn else []
    cross.log_rows(rows)
    report = {"checkpoint": meta["path"], "model": meta["model"], "image_size": size,
              "preprocess": meta.get("preprocess"), "threshold": args.threshold, "sets": rows}
    files = _errors(args, model, meta, mistakes, report)
    names = _write(args, files + [
        ("cross_source.png", lambda path: cross.plot(rows, path, title=f"{meta['model']}: ROC AUC per set")),
        ("metrics.json", lambda path: atomic_write_json(path, showable(to_jsonable(report)))),
    ])
    logger.info("wrote %s into %s", ", ".join(names), shown(args.out))
    return 0


def _both_classes(s, skipped: List[dict], where: str) -> None:
    """InputError naming the set when it gave no readable image of a class (AUC/EER need both)."""
    missing = [name for name, c in (("real", 0), ("fake", 1)) if not (s.labels == c).any()]
    if missing:
        raise InputError(f"{where}: no readable {' and '.join(missing)} images to score ({len(skipped)} skipped): "
                         "AUC/EER need both classes; nothing written")


def _report(args: argparse.Namespace, meta: dict, s, skipped: List[dict], source: dict, mode: str) -> dict:
    m = quiet_metrics(s.labels, s.scores, args.threshold)
    for k in skipped:
        k["path_bytes_hex"] = path_hex(k["path"]) or None
    report = {
        "checkpoint": meta["path"], "model": meta["model"], "image_size": int(meta["image_size"]),
        "epoch": meta.get("epoch"), "preprocess": meta.get("preprocess"), "scoring": mode,
        "inputs": source, "threshold": args.threshold, "metrics": m,
        "n_skipped": len(skipped), "skipped": skipped,
    }
    if args.data is None and len(set(s.groups)) > 2:
        report["per_folder"] = per_group(s, args.threshold, m["eer_threshold"])
    if s.has_faces:
        v = video_level(s, args.pool)
        report["video_metrics"] = {"pool": args.pool, "n_files": len(v.ids),
                                   **quiet_metrics(v.labels, v.scores, args.threshold)}
        report["face_stage"] = args.face_settings.to_dict() if args.face_settings else meta.get("faces")
    return report


def _errors(args: argparse.Namespace, model, meta: dict, sets: list, report: dict) -> list:
    """--errors: the grid files of ``sets`` (``(name, Scores, items)``); their entry goes into ``report``."""
    if not args.errors:
        return []
    cfg = ErrorSettings(args.errors, args.threshold, int(meta["image_size"]), scoring_mode(args, meta), args.device,
                        args.batch_size, args.workers)
    files, report["errors"] = error_outputs(explainer_from_args(args, model, meta, args.threshold), sets, cfg)
    return files


def _write(args: argparse.Namespace, files) -> List[str]:
    """``(name, write(path))`` pairs into --out together (metrics.json last) or none of them (`OutputSet`)."""
    with OutputSet(args.out, last="metrics.json", stale=OUTPUTS + stale_pngs(args.out)) as outputs:
        for name, write in files:
            with writing(outputs.final(name)):
                write(outputs.path(name))
        return outputs.commit()


def _outputs(args: argparse.Namespace, meta: dict, s, report: dict, rob: Optional[dict], mode: str) -> list:
    files = [
        ("scores.csv", lambda path: write_scores_csv(path, s)),
        *([("video_scores.csv", lambda path: write_scores_csv(path, video_level(s, args.pool)))] if s.has_faces else []),
        ("roc.png", lambda path: plot_roc({"all": (s.labels, s.scores)}, path, title=f"ROC: {meta['model']}")),
        ("scores.png", lambda path: plot_score_hist(s.labels, s.scores, path, threshold=args.threshold,
                                                    title="P(fake) by class")),
    ]
    if rob is not None:
        files += [("robustness.json", lambda path: atomic_write_json(path, showable(to_jsonable(rob)))),
                  ("robustness.png", lambda path: plot_robustness(rob, path, title=f"Robustness: {meta['model']} ({mode})"))]
    return files + [("metrics.json", lambda path: atomic_write_json(path, showable(to_jsonable(report))))]


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = get_args_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return exit_on_out_of_memory("evaluate", args.batch_size, lambda: _run(args))


def _run(args) -> int:
    try:
        check_output_dir("--out", args.out)
        check_apart("--out", args.out, _inputs(args))
        if args.errors:
            check_gradients(args.checkpoint)
        model, meta = load_checkpoint(args.checkpoint, device=args.device)
        args.face_settings = face_settings(args, meta)
        if args.errors:
            explainer_from_args(args, model, meta, args.threshold)  # a bad --cam-layer fails before any scoring
        if args.set:
            return _cross_source(args, model, meta)
        size, mode = int(meta["image_size"]), scoring_mode(args, meta)
        s, items, skipped, source = _score(args, model, meta, mode, need_items=args.robustness or bool(args.errors))
        check_finite(s.scores, s.ids, meta["path"])
    except (CheckpointError, DataError, InputError, OutputError, FileNotFoundError, ValueError) as e:
        logger.error("evaluate: %s", shown(e))
        return 2
    for k in skipped:
        logger.warning("skipped %s: %s %s", shown(k["path"]), k["reason"], shown(k["detail"]))
    missing = [name for name, c in (("real", 0), ("fake", 1)) if not (s.labels == c).any()]
    if missing:
        logger.error("evaluate: no readable %s images to score (%d skipped): AUC/EER need both classes; nothing "
                     "written", " and ".join(missing), len(skipped))
        return 2
    report = _report(args, meta, s, skipped, source, mode)
    log_table(report)
    rob = None
    if args.robustness:
        clean = (s.labels, s.scores) if args.data is None or mode in ("full", "tiles") else None
        rob = run_sweep(model, items, clean=clean, threshold=args.threshold, image_size=size, mode=mode,
                        device=args.device, batch_size=args.batch_size, num_workers=args.workers, norm=norm_of(meta))
    try:
        files = _errors(args, model, meta, [(None, s, items)], report)
        names = _write(args, files + _outputs(args, meta, s, report, rob, mode))
    except ExplainError as e:
        logger.error("evaluate: %s; nothing written", e)
        return 2
    except OutputError as e:
        logger.error("evaluate: %s; nothing written", e)
        return 2
    logger.info("wrote %s into %s", ", ".join(names), shown(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
