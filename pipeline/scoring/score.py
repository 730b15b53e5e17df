"""Score a model on a split's shards (through `build_loader`) or on files and folders (through
`pipeline.data.folders`), and per-folder metrics and the scores CSV of evaluate."""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from pipeline.augment.config import DEFAULT_NORM, AugConfig, Norm
from pipeline.checkpoint import CheckpointError
from pipeline.data.contract import LoaderSpec, drop_repeats
from pipeline.data.folders import Item, collect, shard_items
from pipeline.data.loader import build_loader
from pipeline.data.shards import DataError, resolve_shards
from pipeline.scoring.media import expand
from pipeline.scoring.metrics import quiet_metrics
from pipeline.scoring.modes import score_items
from pipeline.scoring.outputs import path_hex, shown
from shard_tools.format import is_remote
from shard_tools.fsutil import atomic_write_text
from shard_tools.media.stage import FaceSettings

logger = logging.getLogger(__name__)


@dataclass
class Scores:
    """One row per scored image: ``ids`` (path or shard key), original ``sources``, input ``groups``."""

    ids: List[str]
    sources: List[str]
    groups: List[str]
    labels: np.ndarray
    scores: np.ndarray
    faces: Optional[List[Optional[dict]]] = None  # per row, the face-stage metadata of a crop (else None)

    @property
    def has_faces(self) -> bool:
        return self.faces is not None and any(f is not None for f in self.faces)


def video_level(s: Scores, how: str) -> Scores:
    """One row per source file (photo or video) of face-crop rows: `pipeline.scoring.media.pool_files`
    (max over a frame's faces, then ``how`` over frames); a file's label is its crops' label."""
    from pipeline.scoring.media import pool_files

    faces = s.faces or [None] * len(s.ids)
    owners = [(f or {}).get("source_sha256") or src or i for i, src, f in zip(s.ids, s.sources, faces)]
    frames = [int((f or {}).get("frame", 0)) for f in faces]
    pooled = pool_files(owners, frames, s.scores, how)
    first: dict = {}
    for j, o in enumerate(owners):
        first.setdefault(o, j)
    rows = [first[o] for o in pooled]
    return Scores([s.sources[j] or s.ids[j] for j in rows], [s.sources[j] for j in rows], [s.groups[j] for j in rows],
                  s.labels[rows], np.asarray([pooled[o] for o in pooled], dtype=np.float64))


@torch.inference_mode()
def score_shards(model: torch.nn.Module, spec: LoaderSpec, *, need_items: bool = False,
                 progress: bool = True) -> Tuple[Scores, List[Item]]:
    """Score every sample of ``spec.split`` once through `build_loader` (eval mode).

    Returns the scores (sources from the shards' json) and one `Item` per shard sample (for the
    robustness sweep, which reads images by offset; empty for remote shards, which ``need_items``
    makes an error before any scoring). A split whose distinct ids differ from its sample count is
    a `DataError` (the shards do not hold what the manifest says).
    """
    loader = build_loader(spec)
    try:
        local = not any(is_remote(shard) for shard in loader.shardset.shards)
        if need_items and not local:
            raise ValueError(f"{spec.data}: reading shard images one by one (evaluate --robustness or --errors) needs "
                             "local .tar shards; copy them to a local folder first")
        items = shard_items(loader.shardset.shards) if local else []
        ids, labels, scores = _score_loader(model, loader, f"evaluate {spec.split}", progress)
    finally:
        close = getattr(loader, "close", None)  # the DALI pipeline goes now, not at interpreter exit
        if close is not None:
            close()
    ids, labels, scores = drop_repeats(ids, labels, scores)
    if len(ids) != loader.split_samples:
        raise DataError(f"{spec.data} {spec.split}: scored {len(ids)} distinct samples, but the split has "
                        f"{loader.split_samples}; run `deepfake-inspect {spec.data} --verify`")
    sources = {it.path: (it.source, it.group, it.face) for it in items}
    return (Scores(ids, [sources.get(k, ("", ""))[0] for k in ids], [sources.get(k, ("", ""))[1] for k in ids],
                   np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64),
                   [sources.get(k, ("", "", None))[2] for k in ids]), items)


def _score_loader(model: torch.nn.Module, loader, desc: str, progress: bool) -> Tuple[list, list, list]:
    model.eval()
    ids: List[str] = []
    labels: List[float] = []
    scores: List[float] = []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        logits = model(batch.images).reshape(len(batch.ids), -1)[:, 0]
        ids.extend(batch.ids)
        labels.extend(batch.labels.cpu().tolist())
        scores.extend(torch.sigmoid(logits.float()).cpu().tolist())
    return ids, labels, scores


def check_finite(scores: np.ndarray, names: Sequence[str], checkpoint: str) -> None:
    """CheckpointError when the model gave a NaN/inf score: finite weights that overflow, not a bad image."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(scores, dtype=np.float64)))
    if bad.size:
        raise CheckpointError(f"{checkpoint}: the model's output is NaN or infinite for {bad.size} of {len(scores)} "
                              f"images (e.g. {shown(names[bad[0]])}): its weights overflow; use another checkpoint")


def score_split(model: torch.nn.Module, spec: LoaderSpec, mode: str, *, need_items: bool = False,
                progress: bool = True) -> Tuple[Scores, List[Item]]:
    """Score a split of shards under scoring ``mode``: ``resize``/``center`` through the loaders (eval
    ``preprocess`` resize / crop), ``full``/``tiles`` image by image from the local tars."""
    if mode in ("resize", "center"):
        aug = AugConfig.preset("none", preprocess="resize" if mode == "resize" else "crop")
        return score_shards(model, spec.replace(aug=aug), need_items=need_items, progress=progress)
    shardset = resolve_shards(spec.data, spec.split, storage_options=spec.storage_options)
    if shardset.remote:
        raise ValueError(f"--scoring {mode} on {spec.data}: reads shard images one by one from local .tar shards; "
                         "copy them to a local folder first, or use --scoring resize/center")
    items = shard_items(shardset.shards)
    values, errors = score_items(model, items, image_size=spec.image_size, mode=mode, device=spec.device,
                                 batch_size=spec.batch_size, num_workers=spec.num_workers, progress=progress,
                                 desc=f"evaluate {spec.split} ({mode})", norm=spec.norm)
    if errors:
        i, err = sorted(errors.items())[0]
        raise DataError(f"{items[i].tar[0]}: sample {items[i].path}: {err}; run `deepfake-inspect {spec.data} --verify`")
    return Scores([it.path for it in items], [it.source for it in items], [it.group for it in items],
                  np.asarray([it.label for it in items], dtype=np.int64), values, [it.face for it in items]), items


def score_folders(
    model: torch.nn.Module, real: Sequence[str], fake: Sequence[str], *, image_size: int, mode: str = "resize",
    device: str | torch.device = "cpu", batch_size: int = 128, num_workers: int = 2, progress: bool = True,
    faces: Optional[FaceSettings] = None, norm: Norm = DEFAULT_NORM,
) -> tuple[Scores, List[Item], List[dict]]:
    """Score files under ``real`` and ``fake`` (photos and videos through the face stage ``faces``: one row per
    crop); returns (scores, the items that scored, skip records: files without a crop, unreadable files)."""
    real_items, skipped = collect(real, label=0)
    fake_items, more = collect(fake, label=1)
    files, skipped = real_items + fake_items, skipped + more
    items, _, file_errors, _ = expand(files, faces, workers=num_workers, progress=progress)
    for i, err in sorted(file_errors.items()):
        reason, _, detail = err.partition(": ")
        skipped.append({"path": files[i].path, "label": ("real", "fake")[files[i].label], "reason": reason,
                        "detail": detail})
    values, errors = score_items(model, items, image_size=image_size, mode=mode, device=device, batch_size=batch_size,
                                 num_workers=num_workers, progress=progress, desc="evaluate", norm=norm)
    for i, err in sorted(errors.items()):
        reason, _, detail = err.partition(": ")
        skipped.append({"path": items[i].path, "label": ("real", "fake")[items[i].label], "reason": reason,
                        "detail": detail})
    ok = [i for i in range(len(items)) if i not in errors]
    kept = [items[i] for i in ok]
    scores = Scores([it.path for it in kept], [it.source or it.path for it in kept], [it.group for it in kept],
                    np.asarray([it.label for it in kept], dtype=np.int64), values[ok], [it.face for it in kept])
    return scores, kept, skipped



def per_group(s: Scores, threshold: float, eer_threshold: float) -> List[dict]:
    """Each input folder: its accuracy and mean score, and its AUC/AP against every image of the other class."""
    out = []
    for group in dict.fromkeys(s.groups):
        mask = np.asarray([g == group for g in s.groups])
        label = int(s.labels[mask][0])
        pair = mask | (s.labels != label)
        m = quiet_metrics(s.labels[pair], s.scores[pair], threshold)
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
    """id, source, group, label, score, path_bytes_hex (the exact bytes of ``source`` when it is not
    valid UTF-8 text as it is: `pipeline.scoring.outputs`); UTF-8, written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "source", "group", "label", "score", "path_bytes_hex"])
    for row in zip(s.ids, s.sources, s.groups, s.labels.tolist(), s.scores.tolist()):
        w.writerow([*map(shown, row[:3]), ("real", "fake")[row[3]], f"{row[4]:.6f}", path_hex(row[1])])
    atomic_write_text(path, buf.getvalue())
