"""The face-stage row: frames/s of photos/videos → face crops, split into decode / detect / crop+encode+write,
next to decode-only of the same frames (one process, one file at a time, as each ``--workers`` process runs)."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import List

from pipeline.benchmark.harness import SkipRow, TreeMonitor
from shard_tools.media.crop import face_crop
from shard_tools.media.detect import detect_faces
from shard_tools.media.probe import read_head, video_container
from shard_tools.media.stage import FaceSettings
from shard_tools.media.video import sample_frames


def _videos(folder: str) -> List[str]:
    paths = sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))
    return [p for p in paths if video_container(read_head(p))]


def _decode_only(paths: List[str], s: FaceSettings) -> tuple:
    t0, n = time.perf_counter(), 0
    for p in paths:
        n += sum(1 for _ in sample_frames(p, s.frames, max_pixels=s.max_pixels, max_frames=s.max_frames))
    return time.perf_counter() - t0, n


def _stage(paths: List[str], s: FaceSettings, out: Path) -> dict:
    """The stage's own steps, each timed: decode (incl. RGB conversion), detect, crop+encode+write."""
    t = {"decode": 0.0, "detect": 0.0, "crop_encode_write": 0.0}
    frames = faces = 0
    t_all = time.perf_counter()
    for p in paths:
        it = iter(sample_frames(p, s.frames, max_pixels=s.max_pixels, max_frames=s.max_frames))
        while True:
            t0 = time.perf_counter()
            frame = next(it, None)
            t1 = time.perf_counter()
            t["decode"] += t1 - t0
            if frame is None:
                break
            found = detect_faces(frame.rgb, detector=s.detector, detect_size=s.detect_size, min_face=s.min_face,
                                 threshold=s.threshold)
            t2 = time.perf_counter()
            t["detect"] += t2 - t1
            for i, face in enumerate(found if s.all_faces else found[:1]):
                data, _ = face_crop(frame.rgb, face.box, margin=s.margin, size=s.face_size, quality=s.quality)
                (out / f"{frames}_{i}.jpg").write_bytes(data)
                faces += 1
            t["crop_encode_write"] += time.perf_counter() - t2
            frames += 1
    return {"total": time.perf_counter() - t_all, "frames": frames, "faces": faces, **t}


def row_faces(params: dict, monitor: TreeMonitor) -> List[dict]:
    folder = params.get("media")
    if not folder or not os.path.isdir(folder):
        raise SkipRow("needs --media DIR (a folder of videos, e.g. ../shared/data/ffpp-dev)")
    paths = _videos(folder)
    if not paths:
        raise SkipRow(f"--media {folder}: no video files")
    s = FaceSettings(frames=params.get("media_frames", 32))
    _decode_only(paths[:1], s)  # warm the decoder and the detector's first call
    dec_s, n_dec = _decode_only(paths, s)
    with tempfile.TemporaryDirectory(prefix="deepfake-bench-faces-") as tmp:
        st = _stage(paths, s, Path(tmp))
    outside = st["total"] - st["decode"] - st["detect"]
    common = {"status": "ok", "files": len(paths), "frames_per_video": s.frames, **monitor.memory()}
    return [
        {**common, "img_s": st["frames"] / st["total"],
         "seconds": st["total"], "faces": st["faces"], "decode_s": st["decode"], "detect_s": st["detect"],
         "crop_encode_write_s": st["crop_encode_write"], "share_outside_decode_detect": outside / st["total"],
         "vs_decode_only": (st["frames"] / st["total"]) / (n_dec / dec_s)},
        {**common, "img_s": n_dec / dec_s, "seconds": dec_s},
    ]
