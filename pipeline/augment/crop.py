"""Native-resolution crops (``preprocess='crop'``), uint8, OpenCV: no resampling unless asked for.

Training: each image is optionally down-scaled as a whole (factor and interpolation drawn per
sample: resampling happens to real photos too, so it must not be the class), then cropped to
``image_size`` at even offsets drawn per sample. Evaluation: the centre crop, at an even offset.
Images smaller than the crop are padded by reflection (edge pixel included, by even amounts before
the image) and never up-sampled.
"""
from __future__ import annotations

from typing import List, Optional

import cv2
import numpy as np

from pipeline.augment.params import AugParams, crop_offset

# The order is the one `pipeline.augment.params.draw_params` indexes (``interp``).
DOWNSCALE_INTERPOLATIONS = (cv2.INTER_AREA, cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_LANCZOS4)


def downscale(image: np.ndarray, factor: float, interp: int) -> np.ndarray:
    """``image`` scaled by ``factor`` (<= 1) with interpolation number ``interp``; unchanged at 1."""
    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    if size == (w, h):
        return image
    return cv2.resize(image, size, interpolation=DOWNSCALE_INTERPOLATIONS[int(interp)])


def pad_to(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` padded by reflection so both sides are at least ``size``; the padding before the
    image is even, so the pixel grid keeps its parity."""
    h, w = image.shape[:2]
    if h >= size and w >= size:
        return image
    top = 2 * ((max(0, size - h) + 3) // 4)
    left = 2 * ((max(0, size - w) + 3) // 4)
    bottom, right = max(0, size - h - top), max(0, size - w - left)
    # Mirrored with the edge pixel (BORDER_REFLECT, ``fedcba|abcdef|fedcba``), as the DALI backend's
    # mosaic of flips; cv2 reflects only once: a tiny image needs several rounds for a large pad.
    while top or bottom or left or right:
        ph, pw = image.shape[:2]
        t, b, lft, r = min(top, ph), min(bottom, ph), min(left, pw), min(right, pw)
        image = cv2.copyMakeBorder(image, t, b, lft, r, cv2.BORDER_REFLECT)
        top, bottom, left, right = top - t, bottom - b, left - lft, right - r
    return image


def crop(image: np.ndarray, size: int, fy: Optional[float] = None, fx: Optional[float] = None) -> np.ndarray:
    """A ``size`` x ``size`` view of ``image`` (padded first if smaller) at even offsets: at fractions
    ``fy``/``fx`` of the free range, or the centre when they are None."""
    image = pad_to(image, size)
    h, w = image.shape[:2]
    y, x = crop_offset(h - size, fy), crop_offset(w - size, fx)
    return image[y:y + size, x:x + size]


def crops_into(images: List[np.ndarray], out: np.ndarray, params: Optional[AugParams]) -> None:
    """Write the crop of each uint8 HWC image into ``out[i]`` ([N, S, S, 3]): with ``params`` the
    training crop (down-scaling, random even offsets), without them the centre crop."""
    size = out.shape[1]
    if params is None:
        for slot, image in zip(out, images):
            slot[...] = crop(image, size)
        return
    down, factor, interp = params.down.tolist(), params.factor.tolist(), params.interp.tolist()
    fy, fx = params.crop_y.tolist(), params.crop_x.tolist()
    for i, (slot, image) in enumerate(zip(out, images)):
        if down[i]:
            image = downscale(image, factor[i], interp[i])
        slot[...] = crop(image, size, fy[i], fx[i])
