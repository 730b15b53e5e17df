"""Pictures of explanations: one panel per image (the input, its heat map over it, the score, the name),
grids of panels in titled sections, PNG files written atomically. Pure numpy/OpenCV/Pillow: cheap
enough for every prediction and for a TensorBoard image per epoch."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline.scoring.outputs import shown
from shard_tools.fsutil import atomic_write_bytes

Array = np.ndarray
GAP, LINE, FONT_SIZE = 4, 15, 12
BLACK, RED, GREY = (0, 0, 0), (200, 0, 0), (90, 90, 90)


def _font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def to_hwc(image: Union[Array, torch.Tensor]) -> Array:
    """uint8 HWC RGB from a uint8 CHW tensor or an HWC array."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    return np.ascontiguousarray(image, dtype=np.uint8)


def overlay(image: Array, heat: Array, alpha: float = 0.45) -> Array:
    """``heat`` ([0, 1], any size) as a JET colour map blended over ``image`` (uint8 HWC RGB)."""
    h, w = image.shape[:2]
    heat = cv2.resize(np.clip(heat, 0, 1).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    colour = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * heat), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return np.uint8(np.clip((1 - alpha) * image.astype(np.float32) + alpha * colour, 0, 255))


def _fit(image: Array, box: Tuple[int, int]) -> Array:
    """``image`` scaled to fit ``box`` (h, w), aspect kept: nearest when enlarging (the pixels as they are),
    area when shrinking."""
    h, w = image.shape[:2]
    scale = min(box[0] / h, box[1] / w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_NEAREST if scale >= 1 else cv2.INTER_AREA)


def _ellipsis(text: str, font, width: int) -> str:
    """``text`` cut from the left (file names differ at their end) to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength("…" + text) > width:
        text = text[1:]
    return "…" + text


def caption(score: float, threshold: float, label: Optional[int]) -> Tuple[str, Tuple[int, int, int]]:
    """``P(fake) 0.873 -> fake  (true: real)`` and its colour: red when the call is wrong."""
    called = "fake" if score >= threshold else "real"
    text = f"P(fake) {score:.3f} -> {called}"
    if label in (0, 1):
        truth = ("real", "fake")[label]
        return f"{text}  (true: {truth})", (RED if truth != called else BLACK)
    return text, BLACK


def panel(image: Union[Array, torch.Tensor], heat: Array, *, name: str, score: float, threshold: float = 0.5,
          label: Optional[int] = None, note: str = "", side: Optional[int] = None) -> Array:
    """One explanation: the input and the heat map over it side by side, then the name, the score (and the
    true label when known), and an optional ``note``. ``side``: the box each picture is fitted into
    (default: the image's longest side, kept between 192 and 512 px)."""
    image = to_hwc(image)
    if side is None:
        side = int(np.clip(max(image.shape[:2]), 192, 512))
    pictures = [_fit(image, (side, side)), _fit(overlay(image, heat), (side, side))]
    h, w = pictures[0].shape[:2]
    font = _font()
    lines = [(_ellipsis(shown(name), font, 2 * w + GAP), GREY), caption(score, threshold, label)]
    lines += [(_ellipsis(note, font, 2 * w + GAP), GREY)] if note else []
    canvas = Image.new("RGB", (2 * w + 3 * GAP, h + 2 * GAP + LINE * len(lines)), "white")
    for i, pic in enumerate(pictures):
        canvas.paste(Image.fromarray(pic), (GAP + i * (w + GAP), GAP))
    draw = ImageDraw.Draw(canvas)
    for k, (text, colour) in enumerate(lines):
        draw.text((GAP, h + GAP + k * LINE), text, fill=colour, font=font)
    return np.asarray(canvas)


def grid(sections: Sequence[Tuple[str, Sequence[Array]]], *, columns: int = 4, title: str = "") -> Array:
    """Panels in rows of ``columns`` under each section's title (a section without panels says so)."""
    panels = [p for _, ps in sections for p in ps]
    cell_h = max((p.shape[0] for p in panels), default=0)
    cell_w = max((p.shape[1] for p in panels), default=320)
    width = max(1, min(columns, max((len(ps) for _, ps in sections), default=1))) * (cell_w + GAP) + GAP
    font = _font(FONT_SIZE + 2)
    rows = [(title, None)] if title else []
    for heading, ps in sections:
        rows.append((heading if ps else f"{heading}: none", None))
        rows += [(None, list(ps[i:i + columns])) for i in range(0, len(ps), columns)]
    height = GAP + sum(LINE + GAP if text is not None else cell_h + GAP for text, _ in rows)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = GAP
    for text, row in rows:
        if text is not None:
            draw.text((GAP, y), _ellipsis(text, font, width - 2 * GAP), fill=BLACK, font=font)
            y += LINE + GAP
            continue
        for i, p in enumerate(row):
            canvas.paste(Image.fromarray(p), (GAP + i * (cell_w + GAP), y))
        y += cell_h + GAP
    return np.asarray(canvas)


def png_bytes(image: Array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def save_png(path: Union[str, Path], image: Array) -> None:
    """Write ``image`` (uint8 HWC RGB) as a PNG atomically (no half file under ``path``)."""
    atomic_write_bytes(path, png_bytes(image))
