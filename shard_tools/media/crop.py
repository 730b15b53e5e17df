"""The square face crop: ``margin`` x the face box's longer side, around the box centre, resized and encoded.

Where the square would leave the frame it is first shifted back inside (the crop keeps only real pixels; the
face is then a little off centre, by at most what the margin adds), and only a square larger than the frame
itself is padded, by mirroring the frame's edge rows/columns (OpenCV ``BORDER_REFLECT_101``): no constant
border that a detector could learn as a cue. Shrinking uses area averaging (``INTER_AREA``, no aliasing),
enlarging bicubic. The crop is stored as a JPEG at a fixed, recorded quality (4:2:0, as OpenCV writes it).
"""
from __future__ import annotations

from typing import Tuple

import cv2
import numpy as np


def square_box(box: Tuple[float, float, float, float], margin: float, width: int, height: int) -> Tuple[int, int, int]:
    """``(x0, y0, side)`` of the square crop in frame pixels (``x0``/``y0`` may be negative only where the side
    exceeds the frame's width/height)."""
    x0, y0, x1, y1 = box
    side = max(1, int(round(margin * max(x1 - x0, y1 - y0))))
    left = int(round((x0 + x1) / 2.0 - side / 2.0))
    top = int(round((y0 + y1) / 2.0 - side / 2.0))
    left = min(max(left, 0), width - side) if side <= width else (width - side) // 2
    top = min(max(top, 0), height - side) if side <= height else (height - side) // 2
    return left, top, side


def cut(rgb: np.ndarray, left: int, top: int, side: int) -> np.ndarray:
    """The ``side`` x ``side`` window at (left, top), mirrored at the frame's edges where it leaves the frame."""
    h, w = rgb.shape[:2]
    pads = (max(0, -top), max(0, top + side - h), max(0, -left), max(0, left + side - w))
    window = rgb[max(0, top):min(h, top + side), max(0, left):min(w, left + side)]
    if any(pads):
        window = cv2.copyMakeBorder(window, *pads, cv2.BORDER_REFLECT_101)
    return window


def resize_square(window: np.ndarray, size: int) -> np.ndarray:
    side = window.shape[0]
    if side == size:
        return np.ascontiguousarray(window)
    return cv2.resize(window, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_CUBIC)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV fails only on invalid arrays, which the caller never builds
        raise ValueError("OpenCV could not encode the crop as JPEG")
    return buf.tobytes()


def face_crop(rgb: np.ndarray, box, *, margin: float, size: int, quality: int) -> Tuple[bytes, Tuple[int, int, int]]:
    """JPEG bytes of the ``size`` x ``size`` crop around ``box`` and its square ``(left, top, side)``."""
    h, w = rgb.shape[:2]
    left, top, side = square_box(box, margin, w, h)
    return encode_jpeg(resize_square(cut(rgb, left, top, side), size), quality), (left, top, side)


def centre_crop(rgb: np.ndarray, *, size: int, quality: int) -> Tuple[bytes, Tuple[int, int, int]]:
    """The frame's largest centred square (``--no-face keep``): a whole-frame stand-in, marked as such."""
    h, w = rgb.shape[:2]
    side = min(h, w)
    left, top = (w - side) // 2, (h - side) // 2
    return encode_jpeg(resize_square(cut(rgb, left, top, side), size), quality), (left, top, side)
