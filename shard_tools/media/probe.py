"""What a file is, by its first bytes (never its extension): a still image, a video container, or neither."""
from __future__ import annotations

from typing import Optional

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif", ".gif", ".mpo")
_HEAD = 64


def read_head(path: str) -> bytes:
    """The first bytes of ``path`` (OSError propagates: the caller names the file)."""
    with open(path, "rb") as f:
        return f.read(_HEAD)


def video_container(head: bytes) -> Optional[str]:
    """``mp4`` (ISO BMFF: mp4, mov, m4v, 3gp), ``matroska`` (mkv, webm), ``avi``, or None."""
    if len(head) >= 12 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):
        if head[4:8] != b"ftyp" or not head[8:12].startswith((b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1")):
            return "mp4"  # ftyp brands of AVIF/HEIF stills are images, not videos
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    return None


def kind_by_name(path: str) -> Optional[str]:
    """``video``/``image`` from the extension alone (only to name a mismatch), else None."""
    low = path.lower()
    if low.endswith(VIDEO_EXTS):
        return "video"
    if low.endswith(IMAGE_EXTS):
        return "image"
    return None


def misnamed(path: str, is_video: bool) -> Optional[str]:
    """A one-line reason when the content and the extension disagree on photo vs video, else None."""
    named = kind_by_name(path)
    if named == "image" and is_video:
        return "its content is a video but its name says image: rename it to .mp4/.mov/... if it is one"
    if named == "video" and not is_video:
        return "its name says video but its content is not a video container (an image or other file): rename it"
    return None
