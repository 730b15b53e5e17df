"""The cross-source report of ``deepfake-evaluate --set NAME=REAL_DIR,FAKE_DIR``: how far a model carries.

One row per (set, scoring mode): n, ROC AUC, average precision, EER, accuracy at the threshold and
at the EER threshold; ``--data PACK --split val`` counts as one set. Written as ``cross_source.json``
(also the ``sets`` of metrics.json), printed as a table, and drawn as ``cross_source.png`` (AUC per
set, one bar per scoring mode).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from pipeline.scoring.metrics import _figure, quiet_metrics
from shard_tools.fsutil import atomic_savefig

logger = logging.getLogger(__name__)
COLUMNS = ("n", "roc_auc", "average_precision", "eer", "accuracy", "accuracy_at_eer")


def parse_set(text: str) -> Tuple[str, List[str], List[str]]:
    """``NAME=REAL_DIR,FAKE_DIR`` -> (name, [real], [fake]); ArgumentTypeError naming the flag."""
    name, sep, dirs = text.partition("=")
    parts = dirs.split(",")
    if not sep or not name or len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected NAME=REAL_DIR,FAKE_DIR")
    for d in parts:
        if not Path(d).is_dir():
            raise argparse.ArgumentTypeError(f"--set {name}: {d} is not a folder")
    return name, [parts[0]], [parts[1]]


def row(name: str, mode: str, labels: np.ndarray, scores: np.ndarray, threshold: float, n_skipped: int) -> dict:
    m = quiet_metrics(labels, scores, threshold=threshold)
    return {"set": name, "scoring": mode, **{k: m[k] for k in COLUMNS}, "n_skipped": n_skipped}


def log_rows(rows: Sequence[dict]) -> None:
    fmt = lambda v: "n/a" if v is None or v != v else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    width = max([len(r["set"]) for r in rows] + [3])
    logger.info("%-*s  %-7s %6s %8s %8s %8s %8s %8s", width, "set", "scoring", *COLUMNS)
    for r in rows:
        logger.info("%-*s  %-7s %6s %8s %8s %8s %8s %8s", width, r["set"], r["scoring"],
                    *(fmt(r[k]) for k in COLUMNS))


def plot(rows: Sequence[dict], path: Path, title: str) -> None:
    sets = list(dict.fromkeys(r["set"] for r in rows))
    modes = list(dict.fromkeys(r["scoring"] for r in rows))
    auc: Dict[Tuple[str, str], Optional[float]] = {(r["set"], r["scoring"]): r["roc_auc"] for r in rows}
    fig = _figure((max(5.0, 1.4 * len(sets) * max(1, len(modes)) / 2 + 2), 3.8))
    ax = fig.subplots()
    width = 0.8 / max(1, len(modes))
    for j, mode in enumerate(modes):
        values = [auc.get((s, mode)) or 0.0 for s in sets]
        ax.bar(np.arange(len(sets)) + j * width - 0.4 + width / 2, values, width, label=mode)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(xticks=np.arange(len(sets)), xticklabels=sets, ylim=(0, 1), ylabel="ROC AUC", title=title)
    ax.legend(fontsize=8, title="scoring")
    atomic_savefig(fig, path, dpi=110)
