"""The robustness sweep: score the same images clean and under each degradation level
(`pipeline.augment.degrade`), write robustness.json and robustness.png."""
from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from pipeline.augment.config import DEFAULT_NORM, Norm
from pipeline.augment.degrade import APPLIED, SWEEP, Degradation, default_sweep
from pipeline.scoring.metrics import quiet_metrics

logger = logging.getLogger(__name__)


def _summary(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    m = quiet_metrics(labels, scores, threshold=threshold)
    keys = ("n", "n_real", "n_fake", "accuracy", "accuracy_at_eer", "roc_auc", "average_precision", "eer")
    return {k: m[k] for k in keys}


def run_sweep(
    model: torch.nn.Module,
    items: Sequence,
    *,
    image_size: int,
    mode: str = "resize",
    clean: Optional[Tuple[np.ndarray, np.ndarray]] = None,
    threshold: float = 0.5,
    degradations: Optional[Sequence[Degradation]] = None,
    device="cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    norm: Norm = DEFAULT_NORM,
) -> dict:
    """Score ``items`` (`pipeline.data.folders.Item`) under each degradation; returns the robustness report.

    ``clean`` is ``(labels, scores)`` already computed through the same file path for exactly
    ``items``; when None the clean pass is scored here. Images that fail under a degradation are
    counted in ``n_failed`` of that level and left out of its metrics.
    """
    from pipeline.scoring.modes import score_items

    degradations = list(degradations) if degradations is not None else default_sweep()
    labels = np.asarray([it.label for it in items], dtype=np.int64)
    common = dict(image_size=image_size, mode=mode, device=device, batch_size=batch_size, num_workers=num_workers,
                  progress=progress, norm=norm)

    def level(scores: np.ndarray, errors: Dict[int, str]) -> dict:
        ok = np.isfinite(scores)
        out = _summary(labels[ok], scores[ok], threshold) if ok.any() else {"n": 0}
        out["n_failed"] = int((~ok).sum())
        if errors:
            out["failures"] = dict(list(sorted(errors.items()))[:20])
        return out

    if clean is None:
        scores, errors = score_items(model, items, desc="robustness clean", **common)
        clean_entry = level(scores, errors)
    else:
        clean_entry = {**_summary(clean[0], clean[1], threshold), "n_failed": 0}
    report = {"applied": APPLIED, "threshold": threshold, "image_size": image_size, "scoring": mode, "clean": clean_entry,
              "degradations": {}}
    bar = tqdm(degradations, desc="robustness", unit="level", disable=not progress)
    for d in bar:
        bar.set_postfix_str(d.name)
        scores, errors = score_items(model, items, degrade=d, desc=d.name, **common)
        entry = report["degradations"].setdefault(d.kind, {"parameter": SWEEP[d.kind][1], "levels": []})
        entry["levels"].append({"level": d.level, **level(scores, errors)})
        logger.info("  %-16s AUC %s", d.name, _fmt(entry["levels"][-1].get("roc_auc")))
    return report


def _fmt(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.4f}"


def plot_robustness(report: dict, path, *, title: str = "Robustness") -> None:
    """One PNG: a panel per degradation kind, ROC AUC against its level (clean and chance as lines)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from shard_tools.fsutil import atomic_savefig

    kinds = list(report["degradations"])
    fig = Figure(figsize=(4.0 * max(1, len(kinds)), 3.4), layout="constrained")
    axes = fig.subplots(1, max(1, len(kinds)), squeeze=False)[0]
    clean = report["clean"].get("roc_auc")
    for ax, kind in zip(axes, kinds):
        entry = report["degradations"][kind]
        levels = [e["level"] for e in entry["levels"]]
        aucs = [np.nan if e.get("roc_auc") is None else e["roc_auc"] for e in entry["levels"]]
        x = np.arange(len(levels))
        ax.plot(x, aucs, "o-", color="tab:red", label="degraded")
        if clean is not None and clean == clean:
            ax.axhline(clean, color="tab:blue", ls="--", lw=1, label=f"clean {clean:.3f}")
        ax.axhline(0.5, color="k", ls=":", lw=0.8, label="chance")
        ax.set_xticks(x, [f"{v:g}" for v in levels])
        ax.set(xlabel=entry["parameter"], ylabel="ROC AUC", title=kind, ylim=(0.0, 1.02))
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(title)
    atomic_savefig(fig, path, dpi=110)
