"""Frames of a video: ``K`` evenly spaced indices, decoded sequentially (no seeking), exact indices and times.

Measured on FaceForensics++ c23 (H.264 4:4:4, a keyframe every 250 frames): a seek re-decodes from the last
keyframe, so one seek per sampled frame costs 3-4x a sequential decode that skips the frames between
(``../shared/FACES.md``). Here every packet is decoded in order, only the wanted frames are converted to RGB,
and decoding stops after the last wanted frame. The frame count is the stream's ``nb_frames`` when the
container has it (MP4's sample table), else the packets are counted first (demuxing without decoding, ~1 ms
per thousand frames). Indices count decoded frames, so they are exact for variable frame rates too; each
frame's time is its presentation time stamp. A display rotation (phone videos) is applied to the pixels.
Decoding is single-threaded: the callers run one process per core.

Errors are `BadMedia` with a fixed reason: ``unreadable-video`` (not a container FFmpeg can open: also
a truncated MP4 whose index is missing, or a file still being written), ``no-video-stream`` (audio only),
``no-frames``, ``too-large`` (more pixels per frame than allowed), ``too-long`` (more frames than allowed),
``truncated`` (decoding failed before a wanted frame).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Tuple

import numpy as np

REASONS = ("unreadable-video", "no-video-stream", "no-frames", "too-large", "too-long", "truncated")


class BadMedia(Exception):
    """A photo or video that gives no face crop; ``reason`` from a fixed vocabulary, ``detail`` one line."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


@dataclass(frozen=True)
class Frame:
    index: int
    time: float
    rgb: np.ndarray


def _av_error(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def evenly_spaced(n_frames: int, k: int) -> List[int]:
    """``min(k, n)`` distinct indices spread over ``[0, n)``: the centres of ``k`` equal parts."""
    k = min(k, n_frames)
    return sorted({int((i + 0.5) * n_frames / k) for i in range(k)})


def _count_frames(container, stream) -> int:
    if stream.frames:
        return int(stream.frames)
    n = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    return n


def _rotated(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Pixels as displayed: FFmpeg's rotation is counter-clockwise degrees to turn the frame upright."""
    turns = (int(round(rotation / 90.0)) % 4) if rotation else 0
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


def open_video(path: str, *, max_pixels: int, max_frames: int) -> Tuple[object, object, int]:
    """``(container, stream, n_frames)``; `BadMedia` for anything that cannot be sampled."""
    import av

    try:
        container = av.open(path, mode="r", metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        raise BadMedia("unreadable-video", f"FFmpeg cannot open it ({_av_error(e)}); truncated, still being written, "
                                           "or not a video") from None
    try:
        if not container.streams:
            raise BadMedia("no-frames", "the container holds no stream at all (an empty video)")
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise BadMedia("no-video-stream", f"the container holds no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        stream.thread_type, stream.thread_count = "SLICE", 1
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > max_pixels:
            raise BadMedia("too-large", f"{w}x{h} frames, more than {max_pixels} pixels")
        try:
            n = _count_frames(container, stream)
        except av.FFmpegError as e:
            raise BadMedia("unreadable-video", f"cannot read its packets ({_av_error(e)})") from None
        if n == 0:
            raise BadMedia("no-frames", "the video stream has no frames")
        if n > max_frames:
            raise BadMedia("too-long", f"{n} frames, more than the limit of {max_frames}")
        return container, stream, n
    except BaseException:
        container.close()
        raise


def sample_frames(path: str, k: int, *, max_pixels: int, max_frames: int) -> Iterator[Frame]:
    """Yield the ``k`` evenly spaced frames of ``path`` (upright RGB uint8) in order; one frame in memory.

    `BadMedia` when the video cannot be opened, or decoding fails before the first wanted frame; a video that
    ends early (its header promised more frames) yields what it has.
    """
    import av

    container, stream, n = open_video(path, max_pixels=max_pixels, max_frames=max_frames)
    wanted = evenly_spaced(n, k)
    got = 0
    try:
        index = -1
        for frame in container.decode(stream):
            index += 1
            if index != wanted[got]:
                continue
            rgb = _rotated(frame.to_ndarray(format="rgb24"), getattr(frame, "rotation", 0) or 0)
            yield Frame(index, float(frame.time or 0.0), rgb)
            got += 1
            if got == len(wanted):
                break
    except av.FFmpegError as e:
        if got == 0:
            raise BadMedia("truncated", f"decoding failed at frame {index + 1} of {n} ({_av_error(e)})") from None
    finally:
        container.close()
    if got == 0:
        raise BadMedia("no-frames", f"no frame could be decoded (the header says {n})")
