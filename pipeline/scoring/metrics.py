"""Binary detection metrics (scikit-learn underneath) and reusable plots, shared by train/evaluate.

Convention: label 1 = fake (the positive class), 0 = real; a score is P(fake) (or any score that
grows with "fake"); predictions are ``score >= threshold``.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from sklearn.metrics import average_precision_score, confusion_matrix, precision_recall_curve, roc_auc_score, roc_curve

from shard_tools.fsutil import atomic_savefig

ArrayLike = Union[Sequence[float], np.ndarray]


class SingleClassWarning(UserWarning):
    """Only one class present: ROC AUC, AP and EER are undefined (returned as NaN)."""


def _as_arrays(labels: ArrayLike, scores: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if y.size == 0:
        raise ValueError("no samples: labels and scores are empty")
    if not np.isin(y, (0.0, 1.0)).all():
        bad = sorted(set(np.unique(y[~np.isin(y, (0.0, 1.0))]).tolist()))[:5]
        raise ValueError(f"labels must be 0 (real) or 1 (fake), got {bad}")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    return y.astype(np.int64), s


def equal_error_rate(labels: ArrayLike, scores: ArrayLike) -> Tuple[float, float]:
    """(EER, threshold): where the false-positive rate equals the false-negative rate.

    Linearly interpolated between the two ROC points where ``fnr - fpr`` changes sign; NaN when
    only one class is present.
    """
    y, s = _as_arrays(labels, scores)
    if len(np.unique(y)) < 2:
        return math.nan, math.nan
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    thr = thr.copy()
    thr[0] = min(thr[0], s.max() + 1e-6)  # sklearn's first threshold is +inf
    fnr = 1.0 - tpr
    diff = fnr - fpr  # decreasing from 1 to -1 along the curve
    i = int(np.argmax(diff <= 0))  # first point at or past the crossing; diff[0] = 1 > 0
    j = i - 1
    d0, d1 = diff[j], diff[i]
    w = 0.0 if d0 == d1 else d0 / (d0 - d1)
    eer = fpr[j] + w * (fpr[i] - fpr[j])
    threshold = thr[j] + w * (thr[i] - thr[j])
    return float(eer), float(threshold)


def quiet_metrics(labels: ArrayLike, scores: ArrayLike, threshold: float = 0.5) -> Dict[str, Any]:
    """`binary_metrics` without the `SingleClassWarning`, for callers that report a missing class
    themselves (per-folder rows, robustness levels)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SingleClassWarning)
        return binary_metrics(labels, scores, threshold=threshold)


def binary_metrics(labels: ArrayLike, scores: ArrayLike, threshold: float = 0.5) -> Dict[str, Any]:
    """Detection metrics for one set of labels and scores.

    Returns a dict with ``n``, ``n_real``, ``n_fake``, ``threshold``, ``accuracy``,
    ``balanced_accuracy``, ``precision``, ``recall``, ``f1``, ``roc_auc``, ``average_precision``,
    ``eer``, ``eer_threshold``, ``accuracy_at_eer`` and ``confusion_matrix`` (``[[tn, fp], [fn, tp]]``,
    rows = true real/fake). With a single class, ROC AUC, AP and EER are NaN and a
    `SingleClassWarning` is issued (use `to_jsonable` before writing JSON).
    """
    y, s = _as_arrays(labels, scores)
    n_fake = int(y.sum())
    n_real = int(y.size - n_fake)
    pred = (s >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    out: Dict[str, Any] = {
        "n": int(y.size), "n_real": n_real, "n_fake": n_fake, "threshold": float(threshold),
        "accuracy": (tp + tn) / y.size,
        "balanced_accuracy": _mean_defined(tp / n_fake if n_fake else math.nan, tn / n_real if n_real else math.nan),
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "recall": tp / n_fake if n_fake else math.nan,
    }
    p, r = out["precision"], out["recall"]
    out["f1"] = 2 * p * r / (p + r) if (p + r) > 0 else (math.nan if math.isnan(p + r) else 0.0)
    if n_real and n_fake:
        out["roc_auc"] = float(roc_auc_score(y, s))
        out["average_precision"] = float(average_precision_score(y, s))
        eer, eer_thr = equal_error_rate(y, s)
        out["eer"], out["eer_threshold"] = eer, eer_thr
        out["accuracy_at_eer"] = float(((s >= eer_thr).astype(np.int64) == y).mean())
    else:
        only = "fake" if n_fake else "real"
        warnings.warn(
            f"only {only} samples ({y.size}): ROC AUC, average precision and EER are undefined (NaN)",
            SingleClassWarning, stacklevel=2,
        )
        out.update(roc_auc=math.nan, average_precision=math.nan, eer=math.nan, eer_threshold=math.nan,
                   accuracy_at_eer=math.nan)
    out["confusion_matrix"] = [[tn, fp], [fn, tp]]
    return out


def _mean_defined(*values: float) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def to_jsonable(obj: Any) -> Any:
    """Replace NaN/inf floats with None and numpy scalars with Python ones (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# The metric names, one scheme everywhere: `binary_metrics` keys; an epoch row (metrics.csv,
# summary.json) prefixes them with the split (``val_roc_auc``); TensorBoard tags put a slash there
# (``val/roc_auc``, see `tb_tag`).
HEADLINE = ("accuracy", "roc_auc", "average_precision", "eer")


def tb_tag(key: str) -> str:
    """TensorBoard tag of an epoch-row key: ``val_roc_auc`` -> ``val/roc_auc``, ``img_s`` -> ``perf/img_s``."""
    split, _, rest = key.partition("_")
    return f"{split}/{rest}" if split in ("train", "val") and rest else f"perf/{key}"


def format_metrics(m: Mapping[str, Any], keys: Sequence[str] = HEADLINE) -> str:
    """One line such as ``accuracy=0.912 roc_auc=0.968 ...`` for logs."""
    return " ".join(f"{k}={m[k]:.4f}" if isinstance(m.get(k), float) else f"{k}={m.get(k)}" for k in keys)


def _figure(figsize: Tuple[float, float] = (5.0, 4.0)):
    # The object-oriented Figure needs no pyplot global state and no interactive backend.
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _plot_curves(curves: Mapping[str, Tuple[ArrayLike, ArrayLike]], path: Union[str, Path], *, kind: str,
                 title: str) -> Path:
    """One ROC or precision-recall plot of ``name -> (labels, scores)``, the area in the legend."""
    fig = _figure()
    ax = fig.add_subplot()
    for name, (labels, scores) in curves.items():
        y, s = _as_arrays(labels, scores)
        if len(np.unique(y)) < 2:
            ax.plot([], [], label=f"{name} (one class: no curve)")
        elif kind == "roc":
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, s):.3f})")
        else:
            prec, rec, _ = precision_recall_curve(y, s)
            ax.plot(rec, prec, label=f"{name} (AP {average_precision_score(y, s):.3f})")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="false positive rate (real called fake)", ylabel="true positive rate (fake caught)")
    else:
        ax.set(xlabel="recall (fake)", ylabel="precision (fake)")
    ax.set(title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8)
    atomic_savefig(fig, path, dpi=120)
    return Path(path)


def plot_roc(
    curves: Mapping[str, Tuple[ArrayLike, ArrayLike]], path: Union[str, Path], *, title: str = "ROC curve",
) -> Path:
    """ROC curves of one or more ``name -> (labels, scores)`` on one plot, AUC in the legend; written atomically."""
    return _plot_curves(curves, path, kind="roc", title=title)


def plot_pr(
    curves: Mapping[str, Tuple[ArrayLike, ArrayLike]], path: Union[str, Path], *, title: str = "Precision-recall",
) -> Path:
    """Precision-recall curves (fake = positive) of ``name -> (labels, scores)``, AP in the legend."""
    return _plot_curves(curves, path, kind="pr", title=title)


def plot_score_hist(
    labels: ArrayLike, scores: ArrayLike, path: Union[str, Path], *, threshold: Optional[float] = 0.5,
    title: str = "Score distribution", bins: int = 50,
) -> Path:
    """Histogram of the scores of real and fake samples, with the decision threshold; atomic."""
    y, s = _as_arrays(labels, scores)
    fig = _figure()
    ax = fig.add_subplot()
    lo, hi = (0.0, 1.0) if s.min() >= 0 and s.max() <= 1 else (float(s.min()), float(s.max()))
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    for cls, name, color in ((0, "real", "tab:blue"), (1, "fake", "tab:red")):
        if (y == cls).any():
            ax.hist(s[y == cls], bins=edges, alpha=0.6, color=color, label=f"{name} ({int((y == cls).sum())})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3g}")
    ax.set(xlabel="score (P(fake))", ylabel="samples", title=title)
    ax.legend(fontsize=8)
    atomic_savefig(fig, path, dpi=120)
    return Path(path)


def plot_confusion(matrix: Sequence[Sequence[int]], path: Union[str, Path], *, title: str = "Confusion matrix") -> Path:
    """A 2x2 confusion matrix (rows true real/fake, columns predicted) as an annotated image."""
    cm = np.asarray(matrix, dtype=np.int64)
    fig = _figure((4.0, 3.6))
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["real", "fake"], yticklabels=["real", "fake"],
           xlabel="predicted", ylabel="true", title=title)
    atomic_savefig(fig, path, dpi=120)
    return Path(path)


def plot_history(rows: Sequence[Mapping[str, Any]], path: Union[str, Path], *, title: str = "Training") -> Path:
    """Loss, accuracy and ROC AUC per epoch from metrics.csv-style rows (``epoch``, ``train_loss``,
    ``val_loss``, ``val_accuracy``, ``val_roc_auc``); written atomically."""
    fig = _figure((11.0, 3.4))
    axes = fig.subplots(1, 3)

    def col(key: str) -> np.ndarray:
        return np.array([math.nan if r.get(key) in (None, "") else float(r[key]) for r in rows])

    ep = col("epoch")
    axes[0].plot(ep, col("train_loss"), "o-", label="train")
    axes[0].plot(ep, col("val_loss"), "o-", label="val")
    axes[0].set(title="loss", xlabel="epoch")
    axes[0].legend(fontsize=8)
    axes[1].plot(ep, col("val_accuracy"), "o-", color="tab:green")
    axes[1].set(title="val accuracy", xlabel="epoch")
    axes[2].plot(ep, col("val_roc_auc"), "o-", color="tab:purple")
    axes[2].set(title="val ROC AUC", xlabel="epoch")
    fig.suptitle(title)
    atomic_savefig(fig, path, dpi=110)
    return Path(path)
