"""Image degradations and the robustness sweep of `pipeline.evaluate` (``--robustness``).

Each degradation maps a decoded uint8 HWC RGB image to one of the same shape, and is applied at
the image's *original* resolution, before the eval resize to the checkpoint's ``image_size`` (as
a shared image is degraded before any detector sees it). Levels:

* ``jpeg``: re-compression with Pillow at quality 95, 75, 50, 30 (4:2:0 chroma subsampling, the
  Pillow default for quality < 100).
* ``downscale``: resize by factor 0.75, 0.5, 0.25 (bilinear, antialias), then back up to the
  original size (bilinear), as the eval resize does. Each side stays >= 1 pixel.
* ``blur``: Gaussian blur with sigma 0.5, 1, 2, 3 original-image pixels (kernel 2*ceil(3 sigma)+1,
  reflect padding, as torchvision ``gaussian_blur``; computed with ``scipy.ndimage``).

`run_sweep` scores the same images clean and under every level (`pipeline.scoring.modes.score_items`) and
returns the ``robustness.json`` report::

    {"applied": "...", "threshold": 0.5, "image_size": 224,
     "clean": {"n", "n_real", "n_fake", "accuracy", "accuracy_at_eer", "roc_auc", "average_precision", "eer", "n_failed"},
     "degradations": {"jpeg": {"parameter": "JPEG quality", "levels": [{"level": 95, <same keys as clean>}, ...]},
                      "downscale": {...}, "blur": {...}}}

`plot_robustness` draws ROC AUC against each level, one panel per kind, with the clean AUC and
chance (0.5) as reference lines.
"""
from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

KINDS = ("jpeg", "downscale", "blur")

# kind -> (levels in sweep order, from mild to severe; what the level means)
SWEEP: Dict[str, Tuple[Tuple[float, ...], str]] = {
    "jpeg": ((95, 75, 50, 30), "JPEG quality"),
    "downscale": ((0.75, 0.5, 0.25), "downscale factor (then back up)"),
    "blur": ((0.5, 1.0, 2.0, 3.0), "Gaussian sigma (px)"),
}


@dataclass(frozen=True)
class Degradation:
    """One degradation at one level; call it on a uint8 HWC RGB numpy array.

    Attributes:
        kind: one of ``jpeg``, ``downscale``, ``blur``.
        level: JPEG quality (1-100), downscale factor (0, 1], or blur sigma (> 0) in pixels.
    """

    kind: str
    level: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"degradation kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.kind == "jpeg" and not (1 <= self.level <= 100 and float(self.level).is_integer()):
            raise ValueError(f"jpeg quality {self.level!r}: expected an integer in [1, 100]")
        if self.kind == "downscale" and not 0 < self.level <= 1:
            raise ValueError(f"downscale factor {self.level!r}: expected a value in (0, 1]")
        if self.kind == "blur" and not self.level > 0:
            raise ValueError(f"blur sigma {self.level!r}: expected a value > 0")

    @property
    def name(self) -> str:
        level = int(self.level) if float(self.level).is_integer() else self.level
        return f"{self.kind}:{level}"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{self.name}: expected a uint8 HWC RGB image, got {image.dtype} {image.shape}")
        if self.kind == "jpeg":
            return jpeg_recompress(image, int(self.level))
        if self.kind == "downscale":
            return down_up(image, float(self.level))
        return gaussian_blur(image, float(self.level))


def jpeg_recompress(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode as JPEG at ``quality`` with Pillow and decode again."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB")).copy()


def down_up(image: np.ndarray, factor: float) -> np.ndarray:
    """Downscale by ``factor`` (bilinear, antialias) then resize back to the original size."""
    from torchvision.transforms.v2 import functional as F

    h, w = image.shape[:2]
    small = [max(1, round(h * factor)), max(1, round(w * factor))]
    x = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)
    x = F.resize(x, small, interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    x = F.resize(x, [h, w], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return x.permute(1, 2, 0).contiguous().numpy()


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with ``sigma`` pixels: kernel side 2*ceil(3 sigma)+1 (capped to the image), reflect
    padding without repeating the edge (torchvision ``gaussian_blur``'s; scipy calls it ``mirror``).

    scipy's separable C filter, single-threaded: torch convolutions here would use the intra-op thread
    pool, which is many times slower when the CPU cores are shared with DataLoader workers.
    """
    from scipy.ndimage import gaussian_filter

    h, w = image.shape[:2]
    radius = min(math.ceil(3 * sigma), h - 1, w - 1)
    if radius < 1:
        return image.copy()
    out = gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0), mode="mirror", radius=(radius, radius, 0))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def default_sweep(kinds: Sequence[str] = KINDS) -> List[Degradation]:
    """Every degradation of `SWEEP` for ``kinds``, in sweep order."""
    out = []
    for kind in kinds:
        if kind not in SWEEP:
            raise ValueError(f"degradation kind {kind!r}: choose one of {', '.join(KINDS)}")
        out.extend(Degradation(kind, level) for level in SWEEP[kind][0])
    return out


APPLIED = ("to the decoded uint8 RGB image at its original resolution, before the eval resize to the "
           "checkpoint's image_size")
