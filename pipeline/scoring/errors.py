"""A look at the mistakes: evaluate's ``--errors N`` (a grid of the N most confident false positives and
false negatives of each set, with heat maps, as a PNG, a TensorBoard image and a key of metrics.json) and
train's per-epoch grid of a fixed few val images (`ValGrid`)."""
from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from pipeline.data.folders import Item, shard_items
from pipeline.scoring.explain import Explainer, ExplainError, explain_views
from pipeline.scoring.explain_files import explain_mode
from pipeline.scoring.modes import ModeItems
from pipeline.scoring.outputs import shown
from pipeline.scoring.render import grid, panel, save_png
from shard_tools.format import is_remote

logger = logging.getLogger(__name__)
TB_EVENTS = "events.out.tfevents.deepfake-evaluate-errors"  # "tfevents" in the name: TensorBoard reads it
GRID_SIDE = 128  # px of each picture in a grid cell


def pick_errors(labels: Sequence[int], scores: Sequence[float], n: int, threshold: float) -> Tuple[List[int], List[int]]:
    """Indices of the ``n`` most confident false positives (real, P(fake) >= threshold, highest first) and
    false negatives (fake, P(fake) < threshold, lowest first); ties keep the input order. Fewer when the
    set has fewer mistakes."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    fp = np.flatnonzero((labels == 0) & (scores >= threshold))
    fn = np.flatnonzero((labels == 1) & (scores < threshold))
    fp = fp[np.lexsort((fp, -scores[fp]))][:n]
    fn = fn[np.lexsort((fn, scores[fn]))][:n]
    return fp.tolist(), fn.tolist()


def png_for(set_name: Optional[str]) -> str:
    """``errors.png`` for evaluate's one set, ``errors-<name>.png`` per --set (name made file-system safe)."""
    if set_name is None:
        return "errors.png"
    return f"errors-{re.sub(r'[^A-Za-z0-9._-]+', '_', set_name).strip('._')[:80] or 'set'}.png"


def stale_pngs(out) -> Tuple[str, ...]:
    """Earlier runs' error grids in ``out`` (names vary with the sets): removed unless this run rewrites them."""
    out = Path(out)
    return tuple(sorted(p.name for p in out.glob("errors*.png"))) if out.is_dir() else ()


@dataclass
class ErrorSettings:
    """How evaluate draws the mistakes: ``n`` per kind, the scoring ``mode`` and how to read the images."""

    n: int
    threshold: float
    image_size: int
    mode: str
    device: str = "cpu"
    batch_size: int = 32
    num_workers: int = 0


def _views(items: Sequence[Item], cfg: ErrorSettings) -> List[Optional[torch.Tensor]]:
    """Each item's model input as it was scored (tiles: the whole image, `explain_mode`); None if unreadable."""
    data = ModeItems(items, cfg.image_size, explain_mode(cfg.mode)[0])
    out = []
    for k in range(len(items)):
        _, views, err = data[k]
        if views is None:
            logger.warning("--errors: could not read %s again: %s", shown(items[k].path), shown(err))
        out.append(None if views is None else views[0])
    return out


def set_errors(explainer: Explainer, name: Optional[str], s, items: Sequence[Item],
               cfg: ErrorSettings) -> Tuple[np.ndarray, dict]:
    """The grid image of one set's mistakes and its metrics.json entry. ``s`` is a
    `pipeline.scoring.score.Scores`; ``items`` the items it scored (matched by id)."""
    fp, fn = pick_errors(s.labels, s.scores, cfg.n, cfg.threshold)
    by_id = {it.path: it for it in items}
    missing = [s.ids[i] for i in fp + fn if s.ids[i] not in by_id]
    if missing:
        raise ExplainError(f"--errors: cannot read the image of {shown(missing[0])} again")
    views = _views([by_id[s.ids[i]] for i in fp + fn], cfg)
    keep = [(i, v) for i, v in zip(fp + fn, views) if v is not None]
    _, maps = explain_views(explainer, [v for _, v in keep], device=cfg.device, batch_size=cfg.batch_size)
    note = explain_mode(cfg.mode)[1]
    cells = {i: panel(v, m, name=s.sources[i] or s.ids[i], score=float(s.scores[i]), threshold=cfg.threshold,
                      label=int(s.labels[i]), note=note, side=GRID_SIDE) for (i, v), m in zip(keep, maps)}
    n_fp = int(((s.labels == 0) & (s.scores >= cfg.threshold)).sum())
    n_fn = int(((s.labels == 1) & (s.scores < cfg.threshold)).sum())
    sections = [(f"{len(fp)} most confident false positives of {n_fp} (real, P(fake) >= {cfg.threshold:g}; highest first)",
                 [cells[i] for i in fp if i in cells]),
                (f"{len(fn)} most confident false negatives of {n_fn} (fake, P(fake) < {cfg.threshold:g}; lowest first)",
                 [cells[i] for i in fn if i in cells])]
    title = f"{name or 'evaluate'}: scoring {cfg.mode}, heat maps at {explainer.layer} ({explainer.method})"
    image = grid(sections, columns=min(max(cfg.n, 1), 4), title=title)
    row = lambda i: {"id": s.ids[i], "source": s.sources[i], "score": float(s.scores[i])}  # noqa: E731
    entry = {"png": png_for(name), "tensorboard_tag": f"errors/{name or 'all'}", "n_false_positives": n_fp,
             "n_false_negatives": n_fn, "false_positives": [row(i) for i in fp],
             "false_negatives": [row(i) for i in fn]}
    return image, entry


def write_tb_images(path: Path, images: Dict[str, np.ndarray], step: int = 0) -> None:
    """One TensorBoard event file at ``path`` holding ``images`` (tag -> uint8 HWC), written beside it first."""
    from torch.utils.tensorboard import SummaryWriter

    with tempfile.TemporaryDirectory(prefix=".tmp-tb-", dir=Path(path).parent) as tmp:
        writer = SummaryWriter(tmp)
        for tag, image in images.items():
            writer.add_image(tag, image, step, dataformats="HWC")
        writer.close()
        (event,) = Path(tmp).glob("events.out.tfevents.*")
        os.replace(event, path)


def error_outputs(explainer: Explainer, sets: Sequence[tuple], cfg: ErrorSettings) -> Tuple[list, dict]:
    """evaluate ``--errors``: ``sets`` of ``(name or None, Scores, items)`` -> the files to write
    (``(name, write(path))``: a PNG per set and one TensorBoard event file) and the metrics.json entry."""
    images, entries = {}, {}
    for name, s, items in sets:
        image, entry = set_errors(explainer, name, s, items, cfg)
        images[entry["tensorboard_tag"]] = image
        entries[name or "all"] = entry
        logger.info("--errors: %s: %d of %d false positives, %d of %d false negatives drawn -> %s", name or "all",
                    len(entry["false_positives"]), entry["n_false_positives"], len(entry["false_negatives"]),
                    entry["n_false_negatives"], entry["png"])
    files: List[Tuple[str, Callable]] = [(e["png"], (lambda path, im=images[e["tensorboard_tag"]]: save_png(path, im)))
                                         for e in entries.values()]
    files.append((TB_EVENTS, lambda path: write_tb_images(path, images)))
    summary = {"n": cfg.n, "threshold": cfg.threshold, "scoring": cfg.mode, "layer": explainer.layer,
               "method": explainer.method, "png": [e["png"] for e in entries.values()], "tensorboard": TB_EVENTS,
               "sets": entries}
    return files, summary


@dataclass
class ValGrid:
    """A fixed few val images (the same every epoch), explained by the model of the moment: train's
    per-epoch TensorBoard image. Build with `ValGrid.from_shards`."""

    views: List[torch.Tensor]
    names: List[str]
    labels: List[int]
    image_size: int
    layer: Optional[str] = None
    _explainer: Optional[Explainer] = field(default=None, repr=False)

    @classmethod
    def from_shards(cls, shards: Sequence[str], k: int, *, image_size: int, preprocess: str) -> Optional["ValGrid"]:
        """The first ``k`` val samples by id, half of each class where the split allows (None when ``k`` is
        0 or the shards are not local files: logged)."""
        if k <= 0:
            return None
        if any(is_remote(sh) for sh in shards):
            logger.info("explanation grid: the val shards are remote; no per-epoch heat maps (they need local shards)")
            return None
        items = sorted(shard_items(shards), key=lambda it: it.path)
        real, fake = [it for it in items if it.label == 0], [it for it in items if it.label == 1]
        n_real = min(len(real), max(k - len(fake), (k + 1) // 2))
        chosen = real[:n_real] + fake[:k - n_real]
        data = ModeItems(chosen, image_size, "resize" if preprocess == "resize" else "center")
        views, names, labels = [], [], []
        for j, it in enumerate(chosen):
            _, v, err = data[j]
            if v is None:
                logger.warning("explanation grid: skipped val sample %s: %s", it.path, err)
                continue
            views.append(v[0])
            names.append(it.source or it.path)
            labels.append(it.label)
        return cls(views, names, labels, image_size) if views else None

    def image(self, model: torch.nn.Module, title: str = "") -> np.ndarray:
        """The grid (uint8 HWC) of these images explained by ``model`` now (its mode and gradients untouched)."""
        if self._explainer is None or self._explainer.model is not model:
            self._explainer = Explainer.for_model(model, image_size=self.image_size, layer=self.layer)
            self.layer = self._explainer.layer
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
        scores, maps = explain_views(self._explainer, self.views, device=device, batch_size=len(self.views))
        cells = [panel(v, m, name=n, score=float(sc), label=lab, side=GRID_SIDE)
                 for v, m, n, sc, lab in zip(self.views, maps, self.names, scores, self.labels)]
        return grid([(f"{len(cells)} fixed val images, heat maps at {self.layer}", cells)], columns=4, title=title)
