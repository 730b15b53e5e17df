"""Face-aware self-blending: the blend mask placed and sized on the face the face stage detected.

SBI (Shiohara & Yamasaki, CVPR 2022) blends through a landmark hull, so the blend boundary sits where a face
swap's does. The offline detectors of the face stage give a box, not landmarks; every face-stage sample's json
records that box and its square crop, so the mask's ellipse can follow the face instead of sitting at a fixed
place near the crop's centre (`pipeline.augment.self_blend`'s default, still used for samples without a box).
"""
from __future__ import annotations

import json
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

_HALF_W = (0.42, 0.55)  # mask half-width as a fraction of the face box's width (cheek to cheek)
_HALF_H = (0.50, 0.62)  # mask half-height as a fraction of its height (the box runs brows to chin)
_RAISE = 0.06           # centre raised by this fraction of the box height, towards the forehead


def _unit(value, bounds) -> np.ndarray:
    """Where ``value`` lies in ``bounds`` (low, high), as 0..1 (0.5 for an empty range)."""
    lo, hi = bounds
    return np.clip((np.asarray(value) - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.asarray(0.5)


def place_on_face(p: Dict[str, np.ndarray], box: Sequence[float], cfg) -> Dict[str, np.ndarray]:
    """``p`` with its mask moved onto the detected face: ``box`` = (x0, y0, x1, y1) of the face stage's detector
    box as fractions of the crop. The drawn size and aspect keep their randomness, mapped to a half-width of
    0.42-0.55 x the box's width and a half-height of 0.50-0.62 x its height; the centre is the box's (raised a
    little towards the forehead) plus the drawn offset scaled to the box (the default ranges are set for a face
    about 0.4 of the crop wide). SBI draws its mask from a landmark hull; the offline detectors here give boxes,
    so the box stands in for the hull."""
    x0, y0, x1, y1 = (np.asarray(v, dtype=np.float64) for v in box)  # scalars, or one value per row of p
    bw, bh = np.maximum(x1 - x0, 1e-3), np.maximum(y1 - y0, 1e-3)
    size = _unit(p["half_w"], cfg.mask_half_width)
    aspect = _unit(p["half_h"] / p["half_w"], cfg.mask_aspect)
    q = dict(p)
    q["cx"] = (x0 + x1) / 2.0 + (p["cx"] - 0.5) * bw / 0.4  # p's centre is absolute (0.5 = the middle)
    q["cy"] = (y0 + y1) / 2.0 - _RAISE * bh + (p["cy"] - 0.5) * bh / 0.4
    q["half_w"] = (_HALF_W[0] + (_HALF_W[1] - _HALF_W[0]) * size) * bw
    q["half_h"] = (_HALF_H[0] + (_HALF_H[1] - _HALF_H[0]) * (size + aspect) / 2.0) * bh
    if isinstance(p["half_w"], float):
        q["half_w"], q["half_h"] = float(q["half_w"]), float(q["half_h"])
    return q


def face_box_in_crop(face: Optional[dict]) -> Optional[Tuple[float, float, float, float]]:
    """The detector box of a face-stage sample (its json ``face``) as fractions of its square crop, clipped to
    [0, 1]; None for a sample without one (ready-made crops, ``--no-face keep`` stand-ins, bad metadata)."""
    try:
        x0, y0, x1, y1 = (float(v) for v in face["box"])
        left, top, side = (float(v) for v in face["crop"])
    except (TypeError, KeyError, ValueError):
        return None
    if side <= 0 or x1 <= x0 or y1 <= y0:
        return None
    box = tuple(min(1.0, max(0.0, v)) for v in ((x0 - left) / side, (y0 - top) / side, (x1 - left) / side,
                                                 (y1 - top) / side))
    return box if box[2] > box[0] and box[3] > box[1] else None


def sample_face_box(sample: dict) -> Optional[Tuple[float, float, float, float]]:
    """The face-stage box of a raw webdataset sample (its ``json`` member) as fractions of its crop, or None."""
    try:
        meta = json.loads(sample.get("json") or b"null")
    except ValueError:
        return None
    return face_box_in_crop(meta.get("face")) if isinstance(meta, dict) else None
