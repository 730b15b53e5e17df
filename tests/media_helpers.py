"""Test helpers for the face stage: real videos written with PyAV, photos composed from real face JPEGs."""
from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path
from typing import List, Optional, Sequence

import av
import cv2
import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FACES = SHARED / "faces"
FFPP = SHARED / "ffpp-dev"


def face_jpegs(kind: str, n: int, start: int = 0) -> List[Path]:
    return sorted((FACES / kind).iterdir())[start:start + n]


def face_rgb(path: Path, size: int = 160) -> np.ndarray:
    return cv2.resize(cv2.imread(str(path))[:, :, ::-1], (size, size), interpolation=cv2.INTER_AREA)


def scene(faces: Sequence[np.ndarray], width: int = 480, height: int = 320, seed: int = 0,
          at: Optional[Sequence[tuple]] = None) -> np.ndarray:
    """A smooth grey-green background with each face pasted at ``at`` (x, y) or spread along a row."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    bg = np.stack([60 + 40 * np.sin(xx / 47.0 + seed), 90 + 30 * np.cos(yy / 31.0), 70 + 0 * xx], -1)
    img = np.clip(bg + rng.normal(0, 3, bg.shape), 0, 255).astype(np.uint8)
    for k, f in enumerate(faces):
        x, y = at[k] if at else (20 + k * (f.shape[1] + 40), (height - f.shape[0]) // 2)
        img[y:y + f.shape[0], x:x + f.shape[1]] = f
    return img


def write_video(path: Path, frames: Sequence[np.ndarray], fps: int = 10, pts: Optional[Sequence[int]] = None,
                codec: str = "mpeg4") -> Path:
    """An MP4 (or other container by suffix) of RGB ``frames``; ``pts`` in 1/1000 s gives a variable frame rate."""
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if pts is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        for i, rgb in enumerate(frames):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            if pts is not None:
                f.pts, f.time_base = pts[i], Fraction(1, 1000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_audio_only(path: Path, seconds: float = 0.5) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        n = int(16000 * seconds)
        for start in range(0, n, 1024):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, start
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def set_mp4_rotation(path: Path, clockwise: int) -> None:
    """Patch the MP4 track header's display matrix as a phone does (90 = shown turned 90 degrees clockwise)."""
    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")
    version = data[at + 4]
    matrix_at = at + 4 + 4 + (32 if version == 1 else 20) + 8 + 8
    a, b = {0: (1, 0), 90: (0, 1), 180: (-1, 0), 270: (0, -1)}[clockwise]
    m = [a << 16, b << 16, 0, -b << 16, a << 16, 0, 0, 0, 1 << 30]
    data[matrix_at:matrix_at + 36] = struct.pack(">9i", *m)
    path.write_bytes(bytes(data))


def write_empty_video(path: Path) -> Path:
    """A valid MP4 header with a video stream declared and no frame written."""
    c = av.open(str(path), "w")
    s = c.add_stream("mpeg4", rate=10)
    s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
    c.start_encoding()
    c.close()
    return path
