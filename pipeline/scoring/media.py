"""Photos and videos at scoring time: the training pack's face stage, then one score per file.

evaluate and predict hand their file `Item`s to `expand`: under the checkpoint's face settings (recorded by
train from the pack's manifest; ``--faces on|off`` and the face flags override) every photo and video becomes
its face crops, made by exactly the code that made the training crops (`shard_tools.media.stage`), so a
model is scored at the framing it learnt. Without a face stage, images are scored whole as before and a video
is an error row (``video-needs-faces``).

A file's score pools its crops: the largest over a frame's faces (one face-swapped face is enough), then over
the frames (``--pool``): ``mean`` (default; FF++ / DeepfakeBench video AUC), ``max``, or ``confident`` (the
DFDC winner's rule: when more than 11 frames and more than n/2.5 of them score above 0.8, the mean of those;
else when more than 90% score below 0.2, the mean of those; else the mean of all).
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from pipeline.data.folders import Item
from shard_tools.imageio import BadImage
from shard_tools.media.cli import add_face_args, settings_from_args
from shard_tools.media.probe import read_head, video_container
from shard_tools.media.stage import FaceSettings, extract
from shard_tools.media.video import BadMedia

POOLS = ("mean", "max", "confident")
FACES = ("auto", "on", "off")


def add_media_args(p: argparse.ArgumentParser) -> None:
    """``--faces``, ``--pool`` and the face-stage flags (their defaults: the checkpoint's)."""
    g = p.add_argument_group("photos and videos")
    g.add_argument("--faces", choices=FACES, default="auto",
                   help="run the face stage on photos and videos: auto = when the checkpoint was trained on face-stage "
                        "crops (it records the settings), on = always (the checkpoint's settings, else the defaults), "
                        "off = score images whole (videos then fail with video-needs-faces)")
    g.add_argument("--pool", choices=POOLS, default="mean",
                   help="a video's score from its frames' scores (a frame's = the max over its faces): mean, max, or "
                        "confident (DFDC winners: mean of the confident frames)")
    add_face_args(p, defaults_from_checkpoint=True)


def face_settings(args: argparse.Namespace, meta: dict) -> Optional[FaceSettings]:
    """The settings to crop with, or None to score files whole; ValueError naming a bad flag."""
    recorded = meta.get("faces")
    if args.faces == "off" or (args.faces == "auto" and recorded is None):
        return None
    return settings_from_args(args, FaceSettings.from_dict(recorded) if recorded else None)


@dataclass
class FileInfo:
    """What the face stage did with one input file."""

    kind: str = "image"
    frames: int = 0
    crops: int = 0


def _crops(item: Item, settings: dict):
    try:
        res = extract(item.path, FaceSettings(**settings))
    except (BadMedia, BadImage) as e:
        return None, str(e)
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    return res, None


def _is_video(path: str) -> bool:
    try:
        return video_container(read_head(path)) is not None
    except OSError:
        return False


def expand(items: Sequence[Item], settings: Optional[FaceSettings], *, workers: int = 0,
           progress: bool = True) -> Tuple[List[Item], List[int], Dict[int, str], List[FileInfo]]:
    """``(crops, owner, errors, infos)``: the items to score (face crops, or the files themselves without a
    face stage), for each the index of its file, ``{file index: reason}`` for files without any crop, and per
    file what the stage did."""
    infos = [FileInfo() for _ in items]
    if settings is None:
        errors = {i: "video-needs-faces: a video is scored through the face stage; pass --faces on"
                  for i, it in enumerate(items) if it.data is None and it.tar is None and _is_video(it.path)}
        keep = [i for i in range(len(items)) if i not in errors]
        for i in keep:
            infos[i].crops = 1
        return [items[i] for i in keep], keep, errors, infos
    fn = functools.partial(_crops, settings=settings.to_dict())
    crops: List[Item] = []
    owner: List[int] = []
    errors: Dict[int, str] = {}
    # spawn, not fork: the detector's OpenMP calls resolve to torch's libgomp, whose thread team this process
    # has already started; a forked child waits for ever on that team's barrier (seen in detectRGB)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 and len(items) > 1 else None
    try:
        results = pool.imap(fn, items) if pool else map(fn, items)
        for i, (res, err) in enumerate(tqdm(results, total=len(items), desc="faces", unit="file",
                                            disable=not progress or len(items) < 2, leave=False)):
            if err is not None:
                errors[i] = err
                continue
            infos[i] = FileInfo(res.kind, res.frames, len(res.crops))
            for c in res.crops:
                crops.append(replace(items[i], path=f"{items[i].path}#{c.meta['frame']}:{c.meta['index']}",
                                     source=items[i].path, data=c.data, face=c.meta))
                owner.append(i)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return crops, owner, errors, infos


def pool_frames(p: np.ndarray, how: str) -> float:
    """One score from a file's frame scores."""
    p = np.asarray(p, dtype=np.float64)
    if how == "max":
        return float(p.max())
    if how == "confident":
        high, low = p > 0.8, p < 0.2
        if high.sum() > 11 and high.sum() > len(p) / 2.5:
            return float(p[high].mean())
        if low.sum() > 0.9 * len(p):
            return float(p[low].mean())
    return float(p.mean())


def pool_files(owners: Sequence, frames: Sequence[int], scores: np.ndarray, how: str) -> Dict[object, float]:
    """``{owner: score}``: per owner (file), the max over each frame's faces, then `pool_frames` over frames."""
    per_frame: Dict[object, Dict[int, float]] = defaultdict(dict)
    for o, f, s in zip(owners, frames, np.asarray(scores, dtype=np.float64)):
        if np.isfinite(s):
            per_frame[o][f] = max(per_frame[o].get(f, -np.inf), float(s))
    return {o: pool_frames(np.array(list(fr.values())), how) for o, fr in per_frame.items()}
