"""Score image files and folders with a trained checkpoint: one row per image.

    deepfake-predict --checkpoint runs/x img1.jpg photos/ --out preds.csv
    deepfake-predict --checkpoint runs/x/best.safetensors photos/          # CSV on stdout

Folders are walked recursively with the packer's rules (sorted; hidden names skipped and counted);
content decides the format, not the extension. Each image is read with the packer's decoder and
preprocessed exactly as the loaders' eval path (`pipeline.data.folders`). Rows: ``path``, ``p_fake``
(sigmoid of the model's logit), ``label`` (``fake`` when ``p_fake >= --threshold``, else ``real``),
``error`` (empty, or ``reason: detail`` for a file that could not be read; then ``p_fake`` and
``label`` are empty), ``path_bytes_hex`` (empty, or the exact bytes of a path that is not valid UTF-8
or holds control characters: ``path`` then shows it escaped, see `pipeline.scoring.outputs`).
``--explain DIR`` also writes one PNG per scored image (and, with the face stage, per face crop of each photo
and video frame) into DIR: the model's input, its Grad-CAM heat map over it and the score
(`pipeline.scoring.explain_files`; ``--cam-layer``, ``--cam-method``).
``--out *.json`` writes ``{"checkpoint", "model", "image_size", "threshold", "n", "n_errors",
"predictions": [rows]}`` with ``p_fake``/``label``/``path_bytes_hex`` null where not applicable.
Everything written (file or stdout) is UTF-8; the file is written atomically, and an ``--out`` that
cannot be written (a folder, an unwritable place) is refused before any work.

Exit code: 0 when at least one image was scored, 1 when none could be (the rows are still written),
2 for a bad checkpoint (also one whose output is NaN/inf), a missing path, a bad flag or an output
that cannot be written (one error line; nothing written).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: repo root on sys.path, this file's folder off it (else shard_tools/
    _here = os.path.dirname(os.path.abspath(__file__))  # inspect.py would shadow the stdlib's inspect, and so on)
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import csv
import io
import logging
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from pipeline.augment.config import DEFAULT_NORM, Norm
from pipeline.checkpoint import CheckpointError, load_checkpoint, norm_of
from pipeline.data.folders import Item, collect
from pipeline.scoring.cli import (OneLineParser, add_scoring_arg, check_inference_args, default_device, scoring_mode,
                                  stdout_bytes)
from pipeline.scoring.media import add_media_args, expand, face_settings, pool_files
from pipeline.scoring.explain import ExplainError
from pipeline.scoring.explain_files import add_cam_args, check_gradients, explain_rows, explainer_from_args
from pipeline.scoring.modes import score_items
from pipeline.scoring.outputs import (OutputError, check_apart, check_output_dir, check_output_file, exit_on_out_of_memory,
                                      path_hex, showable, shown, writing)
from pipeline.scoring.score import check_finite
from shard_tools.fsutil import atomic_write_json, atomic_write_text
from shard_tools.inputs import InputError
from shard_tools.media.stage import FaceSettings

logger = logging.getLogger("pipeline.predict")
FIELDS = ("path", "p_fake", "label", "error", "path_bytes_hex", "kind", "frames", "faces", "frame", "time", "face")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = OneLineParser(
        description="Predict P(fake) for image files and folders (recursive) with a trained checkpoint.",
        add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders (walked recursively)")
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint, or a run dir (uses RUN_DIR/best.safetensors)")
    g.add_argument("--device", default=default_device(),
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--threshold", type=float, default=0.5, help="P(fake) at or above which the label is 'fake'")
    g.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding worker processes (0: in process)")
    add_scoring_arg(g)
    add_media_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="write rows to this .csv or .json file (default: CSV on stdout)")
    g.add_argument("--per-frame", action="store_true",
                   help="also one row per scored face crop of each video (frame index, time, face index)")
    g = p.add_argument_group("explanations")
    g.add_argument("--explain", default=None, metavar="DIR",
                   help="also write a PNG per scored image into DIR: the input, a class-activation heat map over it "
                        "and the score (plus DIR/explanations.csv); with the face stage, one PNG per face crop of "
                        "each photo and video")
    add_cam_args(g)
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.out is not None and Path(args.out).suffix.lower() not in (".csv", ".json"):
        p.error(f"--out {args.out}: the file name must end in .csv or .json")
    check_inference_args(p, args)


def predict(
    model: torch.nn.Module, paths: List[str], *, image_size: int, mode: str = "resize", threshold: float = 0.5,
    device: str | torch.device = "cpu", batch_size: int = 64, num_workers: int = 0, progress: bool = True,
    checkpoint: str = "the checkpoint", faces: Optional[FaceSettings] = None, pool: str = "mean",
    per_frame: bool = False, norm: Norm = DEFAULT_NORM, crops_out: Optional[List[Tuple[Item, float]]] = None,
) -> List[dict]:
    """One row per file under ``paths``: ``{"path", "p_fake", "label", "error", "kind", "frames", "faces"}``
    (None where not applicable). With a face stage (``faces``) a photo's score is the max over its faces and a
    video's pools its frames (``pool``); a photo with several faces also gets one row per face, and with
    ``per_frame`` each video one row per scored crop (``frame``, ``time``, ``face`` set on those rows).

    ``crops_out``, when given, receives every scored face crop of a photo or video with its score (`--explain`).

    Raises `CheckpointError` (naming ``checkpoint``) when the model's output is NaN or infinite for a
    file that was read: that is the weights' fault, not the file's.
    """
    files, skips = collect(paths)
    if skips:
        logger.info("skipped %d hidden or looping entries (e.g. %s: %s)", len(skips), shown(skips[0]["path"]),
                    skips[0]["reason"])
    crops, owner, errors, infos = expand(files, faces, workers=num_workers, progress=progress)
    scores, crop_errors = score_items(model, crops, image_size=image_size, mode=mode, device=device,
                                      batch_size=batch_size, num_workers=num_workers, progress=progress, desc="predict",
                                      norm=norm)
    read = [j for j in range(len(crops)) if j not in crop_errors]
    check_finite(scores[read], [crops[j].path for j in read], checkpoint)
    for j, err in crop_errors.items():
        errors.setdefault(owner[j], err)
    if crops_out is not None:
        crops_out += [(crops[j], float(scores[j])) for j in read if infos[owner[j]].kind in ("photo", "video")]
    frames = [(c.face or {}).get("frame", 0) for c in crops]
    pooled = pool_files(owner, frames, scores, pool)
    by_file: dict = {}
    for j, i in enumerate(owner):
        by_file.setdefault(i, []).append(j)
    rows = []
    for i, item in enumerate(files):
        info = infos[i]
        base = {"path": item.path, "kind": info.kind, "frames": info.frames or None, "faces": info.crops or None,
                "frame": None, "time": None, "face": None}
        if i not in pooled:
            rows.append({**base, "p_fake": None, "label": None, "error": errors.get(i, "no-face")})
            continue
        rows.append(_row(base, pooled[i], threshold))
        if (info.kind == "video" and per_frame) or (info.kind == "photo" and info.crops > 1):
            for j in by_file[i]:
                face = crops[j].face
                rows.append(_row({**base, "frame": face["frame"], "time": face["time"], "face": face["index"]},
                                 float(scores[j]), threshold))
    return rows


def _row(base: dict, p: float, threshold: float) -> dict:
    return {**base, "p_fake": p, "label": "fake" if p >= threshold else "real", "error": None}


def rows_to_csv(rows: List[dict]) -> str:
    """The CSV text of ``rows``: ``path,p_fake,label,error,path_bytes_hex`` (valid UTF-8 whatever the path)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(FIELDS)
    for r in rows:
        w.writerow([shown(r["path"]), "" if r["p_fake"] is None else f"{r['p_fake']:.6f}", r["label"] or "",
                    shown(r["error"] or ""), path_hex(r["path"]),
                    *("" if r.get(k) is None else r[k] for k in ("kind", "frames", "faces", "frame", "time", "face"))])
    return buf.getvalue()


def rows_to_json(rows: List[dict], meta: dict, threshold: float) -> dict:
    """The ``--out *.json`` document; ``path_bytes_hex`` is null unless the path needed escaping."""
    n_err = sum(r["error"] is not None for r in rows)
    return showable({
        "checkpoint": meta["path"], "model": meta["model"], "image_size": int(meta["image_size"]),
        "scoring": meta.get("scoring"), "threshold": threshold, "n": len(rows), "n_errors": n_err,
        "predictions": [{**r, "path_bytes_hex": path_hex(r["path"]) or None} for r in rows],
    })


def _write(out: Optional[str], rows: List[dict], meta: dict, threshold: float) -> None:
    if out is None:
        stdout_bytes(rows_to_csv(rows))
        return
    with writing(out):
        if Path(out).suffix.lower() == ".json":
            atomic_write_json(out, rows_to_json(rows, meta, threshold))
        else:
            atomic_write_text(out, rows_to_csv(rows))


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = get_args_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return exit_on_out_of_memory("predict", args.batch_size, lambda: _run(args))


def _run(args) -> int:
    try:
        if args.out is not None:
            check_output_file("--out", args.out, "file name ending in .csv or .json")
            check_apart("--out", args.out, [("PATH", p) for p in args.paths])
        if args.explain is not None:
            check_output_dir("--explain", args.explain)
            check_apart("--explain", args.explain, [("PATH", p) for p in args.paths])
            check_gradients(args.checkpoint)
        model, meta = load_checkpoint(args.checkpoint, device=args.device)
        explainer = explainer_from_args(args, model, meta, args.threshold) if args.explain is not None else None
        mode = scoring_mode(args, meta)
        crops: List[Tuple[Item, float]] = []
        rows = predict(model, args.paths, image_size=int(meta["image_size"]), mode=mode, threshold=args.threshold,
                       device=args.device, batch_size=args.batch_size, num_workers=args.workers,
                       checkpoint=meta["path"], faces=face_settings(args, meta), pool=args.pool,
                       per_frame=args.per_frame, norm=norm_of(meta), crops_out=crops)
        rows_all, rows = rows, [r for r in rows if r["frame"] is None and r["face"] is None]  # one per file
        if explainer is not None:  # whole images, and the face crops of photos and videos
            n_png = explain_rows(explainer, rows, Path(args.explain), crops=crops,
                                 image_size=int(meta["image_size"]), mode=mode, device=args.device,
                                 batch_size=args.batch_size, num_workers=args.workers)
            logger.info("wrote %d heat-map PNGs (layer %s, %s) into %s", n_png, explainer.layer, args.cam_method,
                        shown(args.explain))
        n_err = sum(r["error"] is not None for r in rows)
        for r in rows:
            if r["error"] is not None:
                logger.warning("could not read %s: %s", shown(r["path"]), shown(r["error"]))
        _write(args.out, rows_all, {**meta, "scoring": mode}, args.threshold)
    except (CheckpointError, InputError, OutputError, FileNotFoundError, ValueError, ExplainError) as e:
        logger.error("predict: %s", shown(e))
        return 2
    n_fake = sum(r["label"] == "fake" for r in rows)
    logger.info("predicted %d files: %d fake, %d real, %d unreadable or without a face%s", len(rows), n_fake,
                len(rows) - n_fake - n_err, n_err, f" -> {shown(args.out)}" if args.out else "")
    return 0 if len(rows) > n_err else 1


if __name__ == "__main__":
    sys.exit(main())
