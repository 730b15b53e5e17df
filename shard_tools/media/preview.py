"""A preview of what the face stage did to one file: its sampled frames in a grid, boxes drawn."""
from __future__ import annotations

import math
from typing import List, Tuple

import cv2
import numpy as np

from shard_tools.media.crop import encode_jpeg, square_box

_THUMB = 320  # longer side of each frame in the sheet
_MAX_FRAMES = 16


def contact_sheet(frames: List[Tuple[object, list]], settings) -> bytes:
    """JPEG of up to 16 frames (evenly picked), each with its kept faces' boxes (green, with the score) and the
    square crops the stage cut around them (blue)."""
    step = max(1, math.ceil(len(frames) / _MAX_FRAMES))
    tiles = []
    for frame, faces in frames[::step]:
        rgb = frame.rgb
        h, w = rgb.shape[:2]
        scale = _THUMB / max(h, w)
        tile = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        tile = np.ascontiguousarray(tile)
        for face in faces:
            x0, y0, x1, y1 = (round(v * scale) for v in face.box)
            cv2.rectangle(tile, (x0, y0), (x1, y1), (0, 220, 0), 2)
            left, top, side = square_box(face.box, settings.margin, w, h)
            cv2.rectangle(tile, (round(left * scale), round(top * scale)),
                          (round((left + side) * scale), round((top + side) * scale)), (40, 120, 255), 1)
            cv2.putText(tile, f"{face.score:.2f}", (x0, max(12, y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 220, 0), 1)
        cv2.putText(tile, f"frame {frame.index}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
        tiles.append(tile)
    cols = min(4, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    th = max(t.shape[0] for t in tiles)
    tw = max(t.shape[1] for t in tiles)
    sheet = np.zeros((rows * th, cols * tw, 3), np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet[r * th:r * th + t.shape[0], c * tw:c * tw + t.shape[1]] = t
    return encode_jpeg(sheet, 90)
