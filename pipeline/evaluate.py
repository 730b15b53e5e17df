"""Evaluate a checkpoint on a pack output's split, or directly on folders of real and fake images.

    deepfake-evaluate --checkpoint runs/x --data shards/ --split val --out eval/
    deepfake-evaluate --checkpoint runs/x/best.safetensors --real R1 R2 --fake F1 --out eval/ --robustness

Model name and image size come from the checkpoint metadata. Writes into ``--out``:

* ``metrics.json``: counts per class, accuracy at ``--threshold`` and at the EER threshold, ROC AUC,
  average precision, EER, confusion matrix (`pipeline.metrics.binary_metrics`); per input folder
  when more than one folder is given (each folder's accuracy, and the AUC of that folder against
  all images of the other class); every skipped file with its reason.
* ``scores.csv`` (id, source, group, label, score), ``roc.png``, ``scores.png`` (histogram by class).
* with ``--robustness``: ``robustness.json`` and ``robustness.png`` (`pipeline.degrade`).

How images are read: ``--data`` uses the training loaders (`pipeline.loaders.build_loader`,
``train=False``, augmentation ``none``; padding repeats dropped by id). ``--real/--fake`` reads the
files directly (`pipeline.folders`: the packer's walk and decode rules, then the loaders' eval
preprocessing); unreadable files are skipped and listed, never fatal. ``--robustness`` degrades the
decoded image at its original resolution, before the eval resize; with ``--data`` it reads each
sample's image member straight from the local tar (`pipeline.folders.shard_items`) through that
same file path, and its clean reference is scored the same way (so it may differ from the loader's
scores by decoder rounding).
"""
from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import csv
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pipeline.checkpoint import CheckpointError, load_checkpoint
from pipeline.data import DataError, resolve_shards
from pipeline.folders import check_inference_args, Item, collect, score_items, shard_items
from pipeline.loaders import BACKEND_CHOICES, resolve_backend
from pipeline.metrics import SingleClassWarning, binary_metrics, plot_roc, plot_score_hist, to_jsonable
from shard_tools.fsutil import atomic_open, atomic_write_json
from shard_tools.inputs import InputError

logger = logging.getLogger("pipeline.evaluate")


@dataclass
class Scores:
    """One row per scored image: ``ids`` (path or shard key), original ``sources``, input ``groups``."""

    ids: List[str]
    sources: List[str]
    groups: List[str]
    labels: np.ndarray
    scores: np.ndarray


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Score a trained checkpoint on shards or on image folders; write metrics, plots and scores.",
        add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint, or a run dir (uses RUN_DIR/best.safetensors)")
    g.add_argument("--device", default=default_device(), help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--threshold", type=float, default=0.5, help="P(fake) at or above which an image is called fake")
    g = p.add_argument_group("data (give --data, or --real and --fake)")
    g.add_argument("--data", default=None, help="a deepfake-pack output folder (or a shard pattern) to evaluate")
    g.add_argument("--split", default="val", help="split of --data to evaluate")
    g.add_argument("--real", nargs="+", default=None, help="folder(s) or files of real images (read directly, recursive)")
    g.add_argument("--fake", nargs="+", default=None, help="folder(s) or files of fake images (read directly, recursive)")
    g.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="loader backend for --data: dali, torch, or auto (default: dali on CUDA when DALI is "
                        "installed, else torch)")
    g.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding worker processes (0: in process)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="eval", help="folder for metrics.json, scores.csv and the plots")
    g.add_argument("--robustness", action="store_true",
                   help="also re-score after JPEG re-compression (q 95-30), downscale+upscale (0.75-0.25) and "
                        "Gaussian blur (sigma 0.5-3), applied at the original resolution: robustness.json/.png")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.data is not None and (args.real or args.fake):
        p.error("give either --data, or --real and --fake, not both")
    if args.data is None and not (args.real and args.fake):
        p.error("give --data PACK_OUT, or both --real DIR [DIR ...] and --fake DIR [DIR ...]")
    check_inference_args(p, args)


@torch.inference_mode()
def score_shards(
    model: torch.nn.Module, data: str | Path, split: str, *, image_size: int, backend: str = "auto",
    device: str | torch.device = "cpu", batch_size: int = 128, num_workers: int = 2, progress: bool = True,
) -> Scores:
    """Score every sample of ``split`` once through `build_loader` (eval mode); sources from the shards' json."""
    from pipeline.loaders import build_loader, drop_repeats

    loader = build_loader(data, split, backend=backend, device=device, batch_size=batch_size, image_size=image_size,
                          train=False, aug="none", num_workers=num_workers)
    model.eval()
    ids: List[str] = []
    labels: List[float] = []
    scores: List[float] = []
    for batch in tqdm(loader, desc=f"evaluate {split}", unit="batch", disable=not progress, leave=False):
        logits = model(batch.images).reshape(len(batch.ids), -1)[:, 0]
        ids.extend(batch.ids)
        labels.extend(batch.labels.cpu().tolist())
        scores.extend(torch.sigmoid(logits.float()).cpu().tolist())
    ids, labels, scores = drop_repeats(ids, labels, scores)
    shardset = resolve_shards(data, split)
    if shardset.num_samples is not None and shardset.num_samples != len(ids):
        logger.warning("%s %s: scored %d distinct samples, the manifest lists %d", data, split, len(ids),
                       shardset.num_samples)
    sources = {}
    try:
        sources = {it.path: (it.source, it.group) for it in shard_items(shardset.shards)}
    except ValueError:  # remote shards: no per-sample source paths
        pass
    return Scores(ids, [sources.get(k, ("", ""))[0] for k in ids], [sources.get(k, ("", ""))[1] for k in ids],
                  np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64))


def score_folders(
    model: torch.nn.Module, real: Sequence[str], fake: Sequence[str], *, image_size: int,
    device: str | torch.device = "cpu", batch_size: int = 128, num_workers: int = 2, progress: bool = True,
) -> tuple[Scores, List[Item], List[dict]]:
    """Score files under ``real`` and ``fake``; returns (scores, the items that scored, skip records)."""
    real_items, skipped = collect(real, label=0)
    fake_items, more = collect(fake, label=1)
    items, skipped = real_items + fake_items, skipped + more
    values, errors = score_items(model, items, image_size=image_size, device=device, batch_size=batch_size,
                                 num_workers=num_workers, progress=progress, desc="evaluate")
    for i, err in sorted(errors.items()):
        reason, _, detail = err.partition(": ")
        skipped.append({"path": items[i].path, "label": ("real", "fake")[items[i].label], "reason": reason,
                        "detail": detail})
    ok = [i for i in range(len(items)) if i not in errors]
    kept = [items[i] for i in ok]
    scores = Scores([it.path for it in kept], [it.path for it in kept], [it.group for it in kept],
                    np.asarray([it.label for it in kept], dtype=np.int64), values[ok])
    return scores, kept, skipped


def _metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SingleClassWarning)
        return binary_metrics(labels, scores, threshold=threshold)


def per_group(s: Scores, threshold: float, eer_threshold: float) -> List[dict]:
    """Each input folder: its accuracy and mean score, and its AUC/AP against every image of the other class."""
    out = []
    for group in dict.fromkeys(s.groups):
        mask = np.asarray([g == group for g in s.groups])
        label = int(s.labels[mask][0])
        pair = mask | (s.labels != label)
        m = _metrics(s.labels[pair], s.scores[pair], threshold)
        correct = (s.scores[mask] >= threshold).astype(np.int64) == label
        at_eer = (s.scores[mask] >= eer_threshold).astype(np.int64) == label
        out.append({
            "folder": group, "label": ("real", "fake")[label], "n": int(mask.sum()),
            "accuracy": float(correct.mean()), "accuracy_at_eer": float(at_eer.mean()) if np.isfinite(eer_threshold) else None,
            "mean_score": float(s.scores[mask].mean()),
            "roc_auc_vs_other_class": m["roc_auc"], "average_precision_vs_other_class": m["average_precision"],
        })
    return out


def write_scores_csv(path: Path, s: Scores) -> None:
    with atomic_open(path, "w") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "source", "group", "label", "score"])
        for row in zip(s.ids, s.sources, s.groups, s.labels.tolist(), s.scores.tolist()):
            w.writerow([*row[:3], ("real", "fake")[row[3]], f"{row[4]:.6f}"])


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
    for row in report.get("per_folder", []):
        auc = row["roc_auc_vs_other_class"]
        logger.info("  %-40s %-4s n=%-6d acc=%.4f auc_vs_other=%s", row["folder"][-40:], row["label"], row["n"],
                    row["accuracy"], "n/a" if auc is None or auc != auc else f"{auc:.4f}")


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = get_args_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    out = Path(args.out)
    try:
        model, meta = load_checkpoint(args.checkpoint, device=args.device)
        size = int(meta["image_size"])
        common = dict(image_size=size, device=args.device, batch_size=args.batch_size, num_workers=args.workers)
        if args.data is not None:
            # robustness reads the local tars by offset: fail on remote shards before the long part
            items = shard_items(resolve_shards(args.data, args.split).shards) if args.robustness else []
            s = score_shards(model, args.data, args.split, backend=args.backend, **common)
            skipped: List[dict] = []
            source = {"data": str(args.data), "split": args.split,
                      "backend": resolve_backend(args.backend, args.device)}
        else:
            s, items, skipped = score_folders(model, args.real, args.fake, **common)
            source = {"real": list(args.real), "fake": list(args.fake)}
    except (CheckpointError, DataError, InputError, FileNotFoundError, ValueError) as e:
        logger.error("evaluate: %s", e)
        return 2
    for k in skipped:
        logger.warning("skipped %s: %s %s", k["path"], k["reason"], k["detail"])
    missing = [name for name, c in (("real", 0), ("fake", 1)) if not (s.labels == c).any()]
    if missing:
        logger.error("evaluate: no readable %s images to score (%d skipped): AUC/EER need both classes",
                     " and ".join(missing), len(skipped))
        return 2
    m = _metrics(s.labels, s.scores, args.threshold)
    report = {
        "checkpoint": meta["path"], "model": meta["model"], "image_size": size, "epoch": meta.get("epoch"),
        "inputs": source, "threshold": args.threshold, "metrics": m,
        "n_skipped": len(skipped), "skipped": skipped,
    }
    if args.data is None and len(set(s.groups)) > 2:
        report["per_folder"] = per_group(s, args.threshold, m["eer_threshold"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", to_jsonable(report))
    write_scores_csv(out / "scores.csv", s)
    plot_roc({"all": (s.labels, s.scores)}, out / "roc.png", title=f"ROC: {meta['model']}")
    plot_score_hist(s.labels, s.scores, out / "scores.png", threshold=args.threshold, title="P(fake) by class")
    log_table(report)
    if args.robustness:
        from pipeline.degrade import plot_robustness, run_sweep

        clean = (s.labels, s.scores) if args.data is None else None
        rob = run_sweep(model, items, clean=clean, threshold=args.threshold, **common)
        atomic_write_json(out / "robustness.json", to_jsonable(rob))
        plot_robustness(rob, out / "robustness.png", title=f"Robustness: {meta['model']}")
    logger.info("wrote %s", ", ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith("."))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
