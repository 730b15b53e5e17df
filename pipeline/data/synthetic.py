"""A small synthetic real/fake face set for the demo and for smoke runs: nothing is downloaded.

What it is: "real" images are procedural cartoon faces (skin-toned ellipse with shading, eyes,
brows, mouth, hair, a gradient background, sensor noise) saved as JPEG. "Fake" images are made
from *other* procedural faces by the self-blended-image recipe (Shiohara & Yamasaki, CVPR 2022):
a re-coloured, slightly scaled and shifted, blurred or up-sampled copy of the face is blended
back into the image under a soft elliptical mask. The detector has to find the blending boundary,
the colour mismatch and the resampling traces - the same kinds of cues a face-swap leaves.

What it is not: real photographs or the output of a real generator. A model trained on it learns
nothing useful about real deepfakes; it only shows the pipeline working end to end. Both classes
share size, format and JPEG quality, so there is no file-level shortcut.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image, ImageFilter

logger = logging.getLogger(__name__)


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1.0


def make_face(rng: np.random.Generator, size: int) -> np.ndarray:
    """A procedural face, uint8 HWC RGB of ``size`` x ``size``."""
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / s
    c0, c1 = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]

    cy, cx = s * rng.uniform(0.45, 0.55), s * rng.uniform(0.45, 0.55)
    ry, rx = s * rng.uniform(0.30, 0.38), s * rng.uniform(0.22, 0.29)
    r = rng.uniform(120, 245)
    g = r * rng.uniform(0.68, 0.85)
    skin = np.array([r, g, g * rng.uniform(0.7, 0.92)])
    hair = rng.uniform(10, 120, 3)
    head = _ellipse(size, size, cy - ry * 0.25, cx, ry * 0.95, rx * 1.15)
    img[head] = hair
    face = _ellipse(size, size, cy, cx, ry, rx)
    shade = 0.8 + 0.35 * (xx * s - (cx - rx)) / (2 * rx)
    shade = np.clip(shade if rng.random() < 0.5 else shade[:, ::-1], 0.7, 1.15)
    img[face] = (skin * shade[..., None])[face]
    eye_dy, eye_dx = ry * rng.uniform(0.15, 0.3), rx * rng.uniform(0.35, 0.5)
    eye_r = s * rng.uniform(0.02, 0.035)
    for side in (-1, 1):
        img[_ellipse(size, size, cy - eye_dy, cx + side * eye_dx, eye_r, eye_r * 1.6)] = rng.uniform(0, 60, 3)
        img[_ellipse(size, size, cy - eye_dy - eye_r * 2.2, cx + side * eye_dx, eye_r * 0.5, eye_r * 2.2)] = hair
    mouth = _ellipse(size, size, cy + ry * rng.uniform(0.4, 0.55), cx, s * 0.02 + 1, rx * rng.uniform(0.3, 0.5))
    img[mouth] = [rng.uniform(120, 200), rng.uniform(30, 80), rng.uniform(40, 90)]
    img = np.asarray(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(radius=size / 160)), np.float32)
    img += rng.normal(0, 3.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def self_blend(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Self-blended fake: blend a re-coloured, warped, resampled copy of ``image`` into it."""
    size = image.shape[0]
    src = Image.fromarray(image)
    # The "source face": colour-shifted, slightly zoomed and shifted, then blurred or up-sampled.
    gains = rng.uniform(0.85, 1.15, 3)
    moved = np.clip(np.asarray(src, np.float32) * gains + rng.uniform(-12, 12, 3), 0, 255).astype(np.uint8)
    zoom = rng.uniform(1.02, 1.08)
    dx, dy = rng.integers(-3, 4, 2) * max(1, size // 128)
    big = Image.fromarray(moved).resize((int(size * zoom),) * 2, Image.BILINEAR)
    off = (big.size[0] - size) // 2
    moved_img = big.crop((off + dx, off + dy, off + dx + size, off + dy + size))
    if rng.random() < 0.5:
        moved_img = moved_img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.6, 1.4) * size / 128))
    else:  # generator-style: synthesised at half resolution, then up-sampled
        moved_img = moved_img.resize((size // 2, size // 2), Image.BILINEAR).resize((size, size), Image.NEAREST)
    # Soft elliptical mask over the inner face, feathered by a random amount.
    s = float(size)
    mask = _ellipse(size, size, s * rng.uniform(0.45, 0.55), s * rng.uniform(0.45, 0.55),
                    s * rng.uniform(0.22, 0.32), s * rng.uniform(0.17, 0.24)).astype(np.uint8) * 255
    mask_img = Image.fromarray(mask).filter(ImageFilter.GaussianBlur(radius=rng.uniform(1.0, 4.0) * size / 128))
    m = np.asarray(mask_img, np.float32)[..., None] / 255.0 * rng.uniform(0.7, 1.0)
    out = m * np.asarray(moved_img, np.float32) + (1 - m) * np.asarray(src, np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def make_sample_data(out: Path, n_per_class: int = 200, size: int = 96, seed: int = 0,
                     quality: int = 90) -> Tuple[Path, Path]:
    """Write ``out/real`` and ``out/fake`` with ``n_per_class`` JPEGs each; returns both folders.

    Real and fake images come from different procedural faces (no identity in both classes).
    Existing files are reused, so a rerun with the same arguments is instant.
    """
    if n_per_class < 1 or size < 32:
        raise ValueError(f"make_sample_data: need n_per_class >= 1 and size >= 32, got {n_per_class}, {size}")
    out = Path(out)
    real_dir, fake_dir = out / "real", out / "fake"
    for d in (real_dir, fake_dir):
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_per_class):
        # Draw both faces every iteration so the stream of random numbers never depends on which
        # files already exist.
        real = make_face(rng, size)
        fake = self_blend(rng, make_face(rng, size))
        for d, name, arr in ((real_dir, f"real_{i:05d}.jpg", real), (fake_dir, f"fake_{i:05d}.jpg", fake)):
            path = d / name
            if not path.exists():
                tmp = d / f".tmp-{name}"
                Image.fromarray(arr).save(tmp, format="JPEG", quality=quality)
                tmp.replace(path)
    logger.info("sample data: %d real + %d fake %dx%d JPEGs in %s", n_per_class, n_per_class, size, size, out)
    return real_dir, fake_dir
