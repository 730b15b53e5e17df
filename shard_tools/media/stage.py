"""One photo or video → face crops, under one set of `FaceSettings` (pack, deepfake-faces, evaluate, predict).

A file is a video when its first bytes are a video container (MP4/MOV/M4V, Matroska/WebM, AVI), else it
goes through the packer's image validation (`shard_tools.imageio`: formats, EXIF rotation, bombs). A
video sampled into ``frames`` evenly spaced frames and a photo (one "frame") are then treated alike: each
frame's faces are detected (`shard_tools.media.detect`), the largest kept (or all with ``all_faces``, each
with its index, largest first) and cut into a square crop (`shard_tools.media.crop`).

Each crop's ``meta`` (written into the sample's json by the packer) holds: ``kind`` (``photo``/``video``),
``frame`` (decoded-frame index; 0 for a photo), ``time`` (seconds; 0.0 for a photo), ``frames`` (frames
sampled from the file), ``index`` (face index in its frame, 0 = largest; -1 for a ``--no-face keep``
stand-in), ``box`` (the detector's box, frame pixels), ``score``, ``landmarks`` (when the detector gives
them) and ``crop`` (``[left, top, side]`` of the square in frame pixels).

Skip reasons (`BadMedia`, or the image reasons of `shard_tools.imageio.BadImage` for photos): ``no-face``,
``wrong-extension`` (a video named like an image or the reverse: content and name disagree), and the video
reasons of `shard_tools.media.video`.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

import numpy as np

from shard_tools.imageio import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE, load_rgb
from shard_tools.media.crop import centre_crop, face_crop
from shard_tools.media.detect import DETECTORS, check_detector, detect_faces
from shard_tools.media.probe import misnamed, read_head, video_container
from shard_tools.media.video import BadMedia, Frame, sample_frames

NO_FACE = ("skip", "keep")
REASONS = ("no-face", "wrong-extension")


@dataclass(frozen=True)
class FaceSettings:
    """How photos and videos become face crops; recorded in the manifest and in checkpoints trained on them."""

    frames: int = 32
    detector: str = "libfacedetection"
    detect_size: int = 640
    min_face: int = 40
    threshold: float = 0.5
    all_faces: bool = False
    margin: float = 1.3
    face_size: int = 256
    quality: int = 95
    no_face: str = "skip"
    max_frames: int = 20_000
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        for name, lo in (("frames", 1), ("detect_size", 32), ("min_face", 1), ("face_size", 16), ("max_frames", 1),
                         ("max_pixels", 1)):
            if int(getattr(self, name)) < lo:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(self, name)}")
        if not 1.0 <= self.margin <= 4.0:
            raise ValueError(f"--margin must be in [1, 4] (times the face box), got {self.margin}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--face-quality must be in [1, 100], got {self.quality}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"--face-threshold must be in [0, 1], got {self.threshold}")
        if self.detector not in DETECTORS:
            raise ValueError(f"--detector {self.detector!r}: expected one of {', '.join(DETECTORS)}")
        if self.no_face not in NO_FACE:
            raise ValueError(f"--no-face {self.no_face!r}: expected one of {', '.join(NO_FACE)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FaceSettings":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class Crop:
    data: bytes
    meta: dict

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class MediaResult:
    """The crops of one file, with what happened on the way (counts for the manifest)."""

    kind: str
    crops: List[Crop] = field(default_factory=list)
    frames: int = 0
    frames_with_face: int = 0
    faces_found: int = 0


def _frames(path: str, s: FaceSettings):
    """``(kind, frames)``; `BadMedia` / `BadImage` for a file that is neither a readable photo nor video."""
    head = read_head(path)
    if not head:
        raise BadMedia("zero-byte", "the file is empty")
    container = video_container(head)
    wrong = misnamed(path, container is not None)
    if wrong:
        raise BadMedia("wrong-extension", wrong)
    if container is not None:
        return "video", sample_frames(path, s.frames, max_pixels=s.max_pixels, max_frames=s.max_frames)
    return "photo", iter([Frame(0, 0.0, load_rgb(path, max_pixels=s.max_pixels))])


def _check_size(frame: Frame, path: str) -> None:
    if min(frame.rgb.shape[:2]) < DEFAULT_MIN_SIZE:
        raise BadMedia("too-small", f"{frame.rgb.shape[1]}x{frame.rgb.shape[0]} pixels")


def extract(path: str, s: FaceSettings, on_frame: Optional[Callable[[Frame, list], None]] = None) -> MediaResult:
    """The face crops of the photo or video at ``path``; raises `BadMedia` (or `shard_tools.imageio.BadImage`)
    naming the reason when it gives none (``no-face`` unless ``s.no_face == "keep"``). ``on_frame(frame,
    faces)`` sees every sampled frame and its kept faces (previews)."""
    check_detector(s.detector)
    kind, frames = _frames(path, s)
    res = MediaResult(kind)
    for frame in frames:
        _check_size(frame, path)
        res.frames += 1
        faces = detect_faces(frame.rgb, detector=s.detector, detect_size=s.detect_size, min_face=s.min_face,
                             threshold=s.threshold)
        res.faces_found += len(faces)
        res.frames_with_face += bool(faces)
        if on_frame is not None:
            on_frame(frame, faces if s.all_faces else faces[:1])
        base = {"kind": kind, "frame": frame.index, "time": round(frame.time, 4)}
        if not faces and s.no_face == "keep":
            data, sq = centre_crop(frame.rgb, size=s.face_size, quality=s.quality)
            res.crops.append(Crop(data, {**base, "index": -1, "box": None, "score": None, "crop": list(sq)}))
        for i, face in enumerate(faces if s.all_faces else faces[:1]):
            data, sq = face_crop(frame.rgb, face.box, margin=s.margin, size=s.face_size, quality=s.quality)
            meta = {**base, "index": i, "box": list(face.box), "score": face.score, "crop": list(sq)}
            if face.landmarks is not None:
                meta["landmarks"] = [list(p) for p in face.landmarks]
            res.crops.append(Crop(data, meta))
    for c in res.crops:
        c.meta["frames"] = res.frames
    if not res.crops:
        raise BadMedia("no-face", f"no face of at least {s.min_face} px with score >= {s.threshold} in "
                                  f"{res.frames} sampled frame(s)")
    return res


def crops_rgb(res: MediaResult) -> List[np.ndarray]:
    """Decoded crops (for previews and tests)."""
    import cv2

    return [cv2.imdecode(np.frombuffer(c.data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1] for c in res.crops]
