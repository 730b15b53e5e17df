"""Explanations as files: the ``--explain``/``--cam-*`` flags, one PNG per image (`write_explanations`,
for any batch of images, face crops or video frames with their names) and per scored file of predict
(`explain_items`, which re-reads each file the way it was scored).

A PNG is named ``NNNNN_<file name>.png`` (NNNNN: the row of the image in the caller's order; the name
made file-system safe), and ``explanations.csv`` lists ``png, path, p_fake, label, path_bytes_hex``.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.data.folders import Item
from pipeline.scoring.explain import METHODS, Explainer, ExplainError, explain_views
from pipeline.scoring.modes import ModeItems
from pipeline.scoring.outputs import path_hex, shown, writing
from pipeline.scoring.render import panel, save_png
from shard_tools.fsutil import atomic_write_text

logger = logging.getLogger(__name__)
INDEX = "explanations.csv"


def add_cam_args(group) -> None:
    """``--cam-layer`` and ``--cam-method`` (predict, evaluate)."""
    group.add_argument("--cam-layer", default=None, metavar="NAME",
                       help="layer the heat maps are computed at (a module name, e.g. stages.2); default: the last "
                            "convolutional stage whose map is at least 3x3 at the model's input size")
    group.add_argument("--cam-method", default="gradcam", choices=tuple(METHODS),
                       help="class-activation method of the grad-cam package (the map explains the predicted class)")


def check_gradients(checkpoint: str) -> None:
    """An exported ONNX file cannot be explained: ExplainError naming it, before anything is loaded."""
    if Path(checkpoint).suffix.lower() == ".onnx":
        raise ExplainError(f"--checkpoint {checkpoint}: an ONNX export has no gradients, so no heat map can be made "
                           "from it; give the .safetensors checkpoint (or run dir) it was exported from")


def explainer_from_args(args: argparse.Namespace, model, meta: dict, threshold: float) -> Explainer:
    """The `Explainer` the flags ask for (ExplainError: a bad --cam-layer lists the valid names)."""
    return Explainer.for_model(model, image_size=int(meta["image_size"]), layer=args.cam_layer,
                               method=args.cam_method, threshold=threshold)


def png_name(index: int, path: str) -> str:
    """``NNNNN_<safe file name>.png``: unique by the index, readable by the name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).name).strip("._")[:80] or "image"
    return f"{index:05d}_{name}.png"


def explain_mode(mode: str) -> Tuple[str, str]:
    """The view a heat map is made on for scoring ``mode``, and a note for the panel: a tiles score is a mean
    over crops, so its map is made on the whole image at native resolution (the network is convolutional)."""
    if mode == "tiles":
        return "full", "score: mean of tiles; map: the whole image"
    return mode, ""


def write_explanations(explainer: Explainer, views: Sequence[torch.Tensor], names: Sequence[str], out_dir: Path, *,
                       indices: Optional[Sequence[int]] = None, scores: Optional[Sequence[float]] = None,
                       labels: Optional[Sequence[int]] = None, notes: Optional[Sequence[str]] = None,
                       device="cpu", batch_size: int = 32) -> List[Path]:
    """One PNG per uint8 CHW view (any sizes): the view, its heat map, the score, the name. ``scores``
    (default: the explanation's own P(fake)) and ``labels`` (0/1, or -1/None unknown) go in the caption;
    ``indices`` number the files (default 0..N-1). Returns the paths written."""
    own, maps = explain_views(explainer, views, device=device, batch_size=batch_size)
    paths = []
    for j, (view, name) in enumerate(zip(views, names)):
        path = Path(out_dir) / png_name(indices[j] if indices is not None else j, name)
        score = float(scores[j]) if scores is not None else float(own[j])
        label = labels[j] if labels is not None else None
        image = panel(view, maps[j], name=name, score=score, threshold=explainer.threshold, label=label,
                      note=notes[j] if notes else "")
        with writing(path):
            save_png(path, image)
        paths.append(path)
    return paths


def _collate(samples):
    return samples


def explain_items(explainer: Explainer, items: Sequence[Item], scores: Sequence[float], out_dir: Path, *,
                  image_size: int, mode: str, device="cpu", batch_size: int = 32, num_workers: int = 0,
                  indices: Optional[Sequence[int]] = None, progress: bool = True) -> Dict[int, str]:
    """A PNG per item, re-read and preprocessed as ``mode`` scored it (`pipeline.scoring.modes`), with its
    score; then ``explanations.csv``. Returns ``{position: reason}`` of items that could not be read again."""
    out_dir = Path(out_dir)
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    view_mode, note = explain_mode(mode)
    indices = list(indices) if indices is not None else list(range(len(items)))
    per_batch = batch_size if view_mode in ("resize", "center") else max(1, min(batch_size, 8))
    loader = DataLoader(ModeItems(items, image_size, view_mode), batch_size=per_batch, shuffle=False,
                        num_workers=num_workers, collate_fn=_collate)
    rows, failed = [], {}
    for batch in tqdm(loader, desc="explain", unit="batch", disable=not progress or len(loader) < 2, leave=False):
        failed.update({i: err for i, v, err in batch if v is None})
        ok = [(i, v[0]) for i, v, _ in batch if v is not None]
        if not ok:
            continue
        pos = [i for i, _ in ok]
        paths = write_explanations(explainer, [v for _, v in ok], [items[i].path for i in pos], out_dir,
                                   indices=[indices[i] for i in pos], scores=[scores[i] for i in pos],
                                   labels=[items[i].label for i in pos], notes=[note] * len(pos) if note else None,
                                   device=device, batch_size=batch_size)
        rows += [(p.name, items[i].path, float(scores[i])) for p, i in zip(paths, pos)]
    _write_index(out_dir / INDEX, rows, explainer.threshold)
    for i, err in sorted(failed.items()):
        logger.warning("explain: could not read %s again: %s", shown(items[i].path), shown(err))
    return failed


def _write_index(path: Path, rows: List[tuple], threshold: float) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["png", "path", "p_fake", "label", "path_bytes_hex"])
    for png, src, score in rows:
        w.writerow([png, shown(src), f"{score:.6f}", "fake" if score >= threshold else "real", path_hex(src)])
    with writing(path):
        atomic_write_text(path, buf.getvalue())


def explain_rows(explainer: Explainer, rows: List[dict], out_dir: Path, *,
                 crops: Sequence[Tuple[Item, float]] = (), **kwargs) -> int:
    """predict's ``--explain``: a PNG for every whole image that was scored (numbered by its row), and one per
    face crop that predict scored (``crops``: the crop and its score; numbered after the rows, named
    ``FILE#FRAME:FACE``). Returns the number of PNGs written."""
    whole = [(k, r) for k, r in enumerate(rows) if r["error"] is None and r["kind"] == "image"]
    items = [Item(r["path"]) for _, r in whole] + [c for c, _ in crops]
    scores = [r["p_fake"] for _, r in whole] + [p for _, p in crops]
    indices = [k for k, _ in whole] + list(range(len(rows), len(rows) + len(crops)))
    failed = explain_items(explainer, items, np.asarray(scores), out_dir, indices=indices, **kwargs)
    return len(items) - len(failed)
