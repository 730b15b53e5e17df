"""How an image of any size becomes the model's input when scoring (``--scoring``).

* ``resize``: the whole image resized to ``image_size`` (antialiased): how ``preprocess='resize'``
  models were trained.
* ``center``: the centre ``image_size`` crop at native resolution (even offsets; padded by reflection
  when smaller): what validation sees during ``preprocess='crop'`` training.
* ``full``: the whole image at native resolution (the network is fully convolutional), one forward
  pass per image size; odd sides lose their last row/column so the 2x2 grid stays whole.
* ``tiles``: the mean logit of a grid of ``image_size`` crops covering the whole image (even offsets,
  the last row and column of tiles flush with the far edges).

``full`` and ``tiles`` look at most at the centre `FULL_MAX_SIDE` x `FULL_MAX_SIDE` pixels of an image (at
native resolution, even offsets): a 6000 x 6000 photo would otherwise take tens of seconds per pass, and
the robustness sweep makes 16 passes. `score_items` says how many images were bounded.

The default comes from the checkpoint: ``resize`` for resize-trained models, ``full`` for
crop-trained ones (they learnt native-resolution pixels; a large photo's centre crop would show a
patch of skin at a scale they never saw).
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.augment.batch_ops import normalize, resize_uint8
from pipeline.augment.config import DEFAULT_NORM, Norm
from pipeline.augment.crop import crop
from pipeline.data.folders import Item, bad_image_reason, read_item
from shard_tools.imageio import BadImage, load_rgb

logger = logging.getLogger(__name__)
SCORING = ("resize", "center", "full", "tiles")
FULL_MAX_SIDE = 2048  # px per side that full/tiles scoring reads of an image (its centre)
Degrade = Callable[[np.ndarray], np.ndarray]


def default_scoring(preprocess: str) -> str:
    """The scoring mode that matches how a checkpoint was trained."""
    return "resize" if preprocess == "resize" else "full"


def tile_offsets(length: int, size: int) -> List[int]:
    """Even start offsets of crops of ``size`` covering ``[0, length)``, the last flush with the end."""
    if length <= size:
        return [0]
    n = -(-length // size)
    last = (length - size) // 2 * 2
    return sorted({(last * i // (n - 1)) // 2 * 2 for i in range(n)})


def bounded(image: np.ndarray, side: int = FULL_MAX_SIDE) -> np.ndarray:
    """The centre of ``image``, at most ``side`` px per side (even offsets, native resolution)."""
    h, w = image.shape[:2]
    y, x = max(0, (h - side) // 4 * 2), max(0, (w - side) // 4 * 2)
    return image[y:y + min(h, side), x:x + min(w, side)]


def views(image: np.ndarray, mode: str, size: int) -> List[torch.Tensor]:
    """The uint8 CHW input(s) that ``mode`` makes of one uint8 HWC image (``full``/``tiles``: of its `bounded`
    centre)."""
    if mode not in SCORING:
        raise ValueError(f"--scoring {mode!r}: choose one of {', '.join(SCORING)}")
    if mode in ("full", "tiles"):
        image = bounded(image, max(FULL_MAX_SIDE, size))
    chw = lambda a: torch.from_numpy(np.require(a, requirements=["C", "W"])).permute(2, 0, 1).contiguous()  # noqa: E731
    if mode == "resize":
        return [resize_uint8(chw(image), size).contiguous()]
    if mode == "center":
        return [chw(crop(image, size))]
    if mode == "full":
        h, w = image.shape[:2]
        if h < size or w < size:
            image = crop(image, max(size, h, w))  # pad small images by reflection, as the crops are
            h, w = image.shape[:2]
        return [chw(image[: h // 2 * 2, : w // 2 * 2])]
    padded = crop(image, max(size, image.shape[0], image.shape[1])) if min(image.shape[:2]) < size else image
    h, w = padded.shape[:2]
    return [chw(padded[y:y + size, x:x + size]) for y in tile_offsets(h, size) for x in tile_offsets(w, size)]


class ModeItems(Dataset):
    """Decode (+ degrade) each `Item` and make its ``mode`` views; yields ``(index, views | None, reason)``."""

    def __init__(self, items: Sequence[Item], size: int, mode: str, degrade: Optional[Degrade] = None) -> None:
        views(np.zeros((size, size, 3), np.uint8), mode, size)  # a bad mode fails here, not in a worker
        self.items, self.size, self.mode, self.degrade = list(items), size, mode, degrade

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            image = load_rgb(read_item(self.items[i]))
            if self.degrade is not None:
                image = self.degrade(image)
        except BadImage as e:
            return i, None, bad_image_reason(e)
        except Exception as e:  # anything else a decoder throws is still this file's problem, not fatal
            return i, None, f"corrupt: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        big = self.mode in ("full", "tiles") and max(image.shape[:2]) > max(FULL_MAX_SIDE, self.size)
        return i, views(image, self.mode, self.size), "bounded" if big else None


def _collate(samples):
    return samples


def _logits(model: torch.nn.Module, views_: List[torch.Tensor], device: torch.device, norm: Norm) -> List[float]:
    """One logit per image of ``views_`` (a list of per-image view lists): same-shape views batched."""
    flat = [(j, v) for j, vs in enumerate(views_) for v in vs]
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for k, (_, v) in enumerate(flat):
        groups.setdefault(tuple(v.shape), []).append(k)
    out = torch.zeros(len(flat), dtype=torch.float64)
    for idx in groups.values():
        x = normalize(torch.stack([flat[k][1] for k in idx]).to(device, non_blocking=True), norm)
        out[idx] = model(x).reshape(len(idx), -1)[:, 0].double().cpu()
    sums = torch.zeros(len(views_), dtype=torch.float64).index_add_(0, torch.tensor([j for j, _ in flat]), out)
    return (sums / torch.tensor([len(vs) for vs in views_], dtype=torch.float64)).tolist()


@torch.inference_mode()
def score_items(model: torch.nn.Module, items: Sequence[Item], *, image_size: int, mode: str = "resize",
                device: torch.device | str = "cpu", batch_size: int = 64, num_workers: int = 0,
                degrade: Optional[Degrade] = None, progress: bool = True, desc: str = "score",
                norm: Norm = DEFAULT_NORM) -> Tuple[np.ndarray, Dict[int, str]]:
    """P(fake) of each item under scoring ``mode`` (NaN where it failed) and ``{index: "reason: detail"}``;
    inputs normalised with ``norm`` (the checkpoint's: `pipeline.checkpoint.norm_of`)."""
    device = torch.device(device)
    model.eval()
    scores = np.full(len(items), np.nan, dtype=np.float64)
    errors: Dict[int, str] = {}
    if not items:
        return scores, errors
    per_batch = batch_size if mode in ("resize", "center") else max(1, min(batch_size, 8))
    loader = DataLoader(ModeItems(items, image_size, mode, degrade), batch_size=per_batch, shuffle=False,
                        num_workers=num_workers, collate_fn=_collate)
    n_bounded = 0
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress or len(loader) < 2, leave=False):
        ok = [(i, v) for i, v, _ in batch if v is not None]
        errors.update({i: err for i, v, err in batch if v is None})
        n_bounded += sum(v is not None and note == "bounded" for _, v, note in batch)
        if ok:
            logits = _logits(model, [v for _, v in ok], device, norm)
            scores[[i for i, _ in ok]] = 1.0 / (1.0 + np.exp(-np.asarray(logits)))
    if n_bounded:
        logger.warning("%s: %d image(s) larger than %d px on a side were scored on their centre %d px (--scoring %s "
                       "reads at most that much of an image, at native resolution)", desc, n_bounded,
                       max(FULL_MAX_SIDE, image_size), max(FULL_MAX_SIDE, image_size), mode)
    return scores, errors
