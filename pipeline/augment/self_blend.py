"""Self-Blended Images (Shiohara & Yamasaki, CVPR 2022) for face crops without landmarks: uint8 path.

From one REAL image make a pseudo-fake: two copies, one of them (chosen at random) gets a colour
transform (RGB shift, hue/saturation/value, brightness/contrast, fused into one 3x4 colour matrix)
and a frequency transform (nearest down-sampling then bilinear up-sampling, or a 3x3 sharpen); the
source copy is then warped slightly (scale, translation) and blended into the target through a
soft face mask: ``mask * source + (1 - mask) * target``.

Where the defaults leave SBI's code (src/utils/sbi.py, blend.py): its HueSaturationValue limits of +-0.3
act on uint8 HSV levels in albumentations 1.x (at most one level), so the small hue/sat/value ranges here
are an addition; down-sampling factors are (2, 3), not (2, 4) (faces fill about a third of these 256x256
crops, and x4 turns them into blocks); SBI blurs its landmark mask twice (5..25 px), as ``blur_sigma`` does.

The mask replaces SBI's landmark hull with an ellipse (random size, aspect, tilt, offset) near the centre,
or on the face stage's detector box where the sample has one (`place_on_face`: face-aware), elastically
deformed by a smooth displacement field, anti-aliased, blurred, normalised to a peak of 1, moved with the
source's warp, scaled by a blend ratio from ``(0.25, 0.5, 0.75, 1, 1, 1)``; computed on a grid
``mask_stride`` times coarser than the image and up-sampled bilinearly (it is smooth).

Randomness: `draw_choice` / `sample_params` draw from the caller's generator (seeded from (seed, epoch,
sample)); `params_from_uniforms` maps the draws (shared with `pipeline.augment.self_blend_batch`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from pipeline.augment.face_mask import place_on_face

N_UNIFORMS = 24  # uniforms per sample consumed by `params_from_uniforms`
_LUMA = np.array([0.299, 0.587, 0.114])


def _check_range(name: str, value: Tuple[float, float], lo: float, hi: float) -> None:
    if len(value) != 2 or not (lo <= value[0] <= value[1] <= hi):
        raise ValueError(f"SelfBlendConfig.{name}={value!r}: expected (low, high) with {lo} <= low <= high <= {hi}")


def _check_scalar(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"SelfBlendConfig.{name}={value!r}: expected a value in [{lo}, {hi}]")


@dataclass(frozen=True)
class SelfBlendConfig:
    """Parameter ranges of the SBI recipe; each value is drawn uniformly per sample.

    Colour (applied to the transformed copy): ``rgb_shift`` levels per channel with probability
    ``rgb_shift_prob``; hue rotation in degrees; saturation and value gains ``1 +- x``;
    contrast gain ``1 +- x`` about mid-grey; brightness ``+- x * 255`` levels.
    Frequency: with probability ``downscale_prob`` nearest-down / bilinear-up by a factor from
    ``downscale_factors``, else sharpen (albumentations ``Sharpen`` kernel, ``sharpen_alpha``,
    ``sharpen_lightness``). ``source_prob``: probability the source (not the target) is transformed.
    Geometry of the source (and mask): ``scale`` range, translation ``+- translate_x/y`` of the size.
    Mask (fractions of the image width/height): centre offsets ``mask_offset_x/y`` from the
    centre, half-width ``mask_half_width``, ``mask_aspect`` = half-height / half-width, tilt
    ``+- mask_angle`` degrees, ``elastic`` = std of the displacement on an ``elastic_grid``^2 grid,
    ``blur_sigma`` = Gaussian sigma, ``blend_ratios`` = the ratios the mask is scaled by (drawn
    uniformly from the tuple), ``mask_stride`` = coarseness of the grid the mask is computed on.
    """

    source_prob: float = 0.5
    rgb_shift_prob: float = 0.3
    rgb_shift: float = 20.0
    hue_shift: float = 4.0
    sat_shift: float = 0.1
    val_shift: float = 0.05
    contrast: float = 0.1
    brightness: float = 0.1
    downscale_prob: float = 0.5
    downscale_factors: Tuple[int, ...] = (2, 3)
    sharpen_alpha: Tuple[float, float] = (0.2, 0.5)
    sharpen_lightness: Tuple[float, float] = (0.5, 1.0)
    scale: Tuple[float, float] = (0.95, 1.05)
    translate_x: float = 0.03
    translate_y: float = 0.015
    mask_offset_x: Tuple[float, float] = (-0.04, 0.04)
    mask_offset_y: Tuple[float, float] = (-0.05, 0.03)
    mask_half_width: Tuple[float, float] = (0.15, 0.25)
    mask_aspect: Tuple[float, float] = (1.0, 1.3)
    mask_angle: float = 10.0
    elastic: float = 0.04
    elastic_grid: int = 5
    blur_sigma: Tuple[float, float] = (0.008, 0.03)
    blend_ratios: Tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)
    mask_stride: int = 4

    def __post_init__(self) -> None:
        for name in ("source_prob", "rgb_shift_prob", "downscale_prob"):
            _check_scalar(name, getattr(self, name), 0.0, 1.0)
        for name, hi in (("rgb_shift", 255.0), ("hue_shift", 180.0), ("sat_shift", 1.0), ("val_shift", 1.0),
                         ("contrast", 1.0), ("brightness", 1.0), ("translate_x", 0.5), ("translate_y", 0.5),
                         ("mask_angle", 90.0), ("elastic", 0.5)):
            _check_scalar(name, getattr(self, name), 0.0, hi)
        for name, lo, hi in (("sharpen_alpha", 0.0, 1.0), ("sharpen_lightness", 0.0, 10.0), ("scale", 0.5, 2.0),
                             ("mask_offset_x", -0.5, 0.5), ("mask_offset_y", -0.5, 0.5),
                             ("mask_half_width", 0.01, 0.5), ("mask_aspect", 0.2, 5.0), ("blur_sigma", 0.0, 0.25)):
            _check_range(name, getattr(self, name), lo, hi)
        if not self.downscale_factors or any(int(f) != f or f < 1 for f in self.downscale_factors):
            raise ValueError(f"SelfBlendConfig.downscale_factors={self.downscale_factors!r}: expected integers >= 1")
        if not self.blend_ratios or any(not 0.0 < r <= 1.0 for r in self.blend_ratios):
            raise ValueError(f"SelfBlendConfig.blend_ratios={self.blend_ratios!r}: expected values in (0, 1]")
        for name, lo in (("elastic_grid", 2), ("mask_stride", 1)):
            if not isinstance(getattr(self, name), int) or not lo <= getattr(self, name) <= 64:
                raise ValueError(f"SelfBlendConfig.{name}={getattr(self, name)!r}: expected an integer in [{lo}, 64]")


DEFAULT_CONFIG = SelfBlendConfig()


@functools.lru_cache(maxsize=8)
def _bounds(cfg: SelfBlendConfig) -> Tuple[np.ndarray, np.ndarray]:
    """Per-uniform (low, width) so that ``low + width * u`` is each drawn parameter itself."""
    b = np.zeros((N_UNIFORMS, 2))
    b[2:5] = (-cfg.rgb_shift, cfg.rgb_shift)
    for k, x, mid in ((5, cfg.hue_shift, 0.0), (6, cfg.sat_shift, 1.0), (7, cfg.val_shift, 1.0),
                      (8, cfg.contrast, 1.0), (9, cfg.brightness * 255.0, 0.0), (15, cfg.translate_x, 0.0),
                      (16, cfg.translate_y, 0.0), (21, cfg.mask_angle, 0.0)):
        b[k] = (mid - x, mid + x)
    for k, r, mid in ((12, cfg.sharpen_alpha, 0.0), (13, cfg.sharpen_lightness, 0.0), (14, cfg.scale, 0.0),
                      (17, cfg.mask_offset_x, 0.5), (18, cfg.mask_offset_y, 0.5), (19, cfg.mask_half_width, 0.0),
                      (20, cfg.mask_aspect, 0.0), (22, cfg.blur_sigma, 0.0)):
        b[k] = (mid + r[0], mid + r[1])
    return b[:, 0], b[:, 1] - b[:, 0]


def _pick(u: np.ndarray, choices: Sequence[float]) -> np.ndarray:
    idx = np.minimum(np.asarray(u) * len(choices), len(choices) - 1).astype(np.int64)
    return np.asarray(choices)[idx]


def params_from_uniforms(u: np.ndarray, noise: np.ndarray, cfg: SelfBlendConfig) -> Dict[str, np.ndarray]:
    """Map uniforms ``u`` [..., N_UNIFORMS] and standard normals ``noise`` [..., 2, g, g] (g =
    ``cfg.elastic_grid``) to one parameter dict: arrays with the leading batch shape, or Python
    scalars when ``u`` is 1-D (one sample: cheaper downstream). Both the uint8 and the torch path
    draw through this function, so they share every range."""
    lo, width = _bounds(cfg)
    v = lo + width * u
    c = v.tolist() if v.ndim == 1 else list(np.moveaxis(v, -1, 0))
    r = u.tolist() if u.ndim == 1 else list(np.moveaxis(u, -1, 0))
    return {
        "transform_source": r[0] < cfg.source_prob,
        "rgb_shift": v[..., 2:5] * np.asarray(r[1] < cfg.rgb_shift_prob)[..., None],
        "hue": c[5], "saturation": c[6], "value": c[7], "contrast": c[8], "brightness": c[9],
        "downscale": r[10] < cfg.downscale_prob, "factor": _pick(r[11], cfg.downscale_factors),
        "sharpen_alpha": c[12], "sharpen_lightness": c[13], "scale": c[14], "tx": c[15], "ty": c[16],
        "cx": c[17], "cy": c[18], "half_w": c[19], "half_h": c[19] * c[20], "angle": c[21],
        "blur_sigma": c[22], "blend_ratio": _pick(r[23], cfg.blend_ratios), "displacement": noise * cfg.elastic,
    }


def sample_params(rng: np.random.Generator, cfg: SelfBlendConfig) -> Dict[str, np.ndarray]:
    """One sample's parameters drawn from ``rng`` (a dict of Python scalars and small arrays)."""
    g = cfg.elastic_grid
    return params_from_uniforms(rng.random(N_UNIFORMS), rng.standard_normal((2, g, g)), cfg)


def _colour_basis() -> np.ndarray:
    """[5, 3, 3]: ``saturation_matrix @ hue_matrix = B0 + cos*B1 + sin*B2 + s*cos*B3 + s*sin*B4``
    (hue: rotation about the grey axis; saturation ``s``: about luma); one matmul per batch."""
    grey = np.full((3, 3), 1.0 / 3.0)
    cross = np.array([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / np.sqrt(3.0)
    luma = np.outer(np.ones(3), _LUMA)
    return np.stack([grey, luma - grey, luma @ cross, np.eye(3) - luma, cross - luma @ cross])


_COLOUR_BASIS = _colour_basis()


def colour_matrix(p: Dict[str, np.ndarray]) -> np.ndarray:
    """[..., 3, 4] affine colour matrix on 0..255 RGB: RGB shift, then hue rotation, saturation,
    value gain, contrast (about 128) and brightness. A linear stand-in for SBI's HSV shifts: one
    `cv2.transform` instead of two colour-space conversions."""
    theta = np.deg2rad(p["hue"])
    c, s, sat = np.cos(theta), np.sin(theta), p["saturation"]
    coef = np.stack([np.ones_like(c), c, s, sat * c, sat * s], -1)
    lin = (coef @ _COLOUR_BASIS.reshape(5, 9)).reshape(coef.shape[:-1] + (3, 3))
    lin = lin * np.asarray(p["value"] * p["contrast"])[..., None, None]
    offset = np.asarray(128.0 * (1 - p["contrast"]) + p["brightness"])[..., None]
    bias = (lin @ p["rgb_shift"][..., None])[..., 0] + offset
    return np.concatenate([lin, bias[..., None]], -1)


def sharpen_kernel(alpha: float, lightness: float) -> np.ndarray:
    """The 3x3 kernel of albumentations ``Sharpen`` (the one SBI uses); `_transform_copy` applies it
    as ``(1 + alpha * (8 + lightness)) * x - 9 * alpha * box3(x)``, the same filter, twice as fast."""
    kernel = np.full((3, 3), -alpha, np.float32)
    kernel[1, 1] = (1 - alpha) + alpha * (8.0 + lightness)
    return kernel


def _transform_copy(image: np.ndarray, p: Dict[str, np.ndarray]) -> np.ndarray:
    """Colour then frequency transform of one HxWx3 uint8 image (a new array)."""
    matrix = colour_matrix(p).astype(np.float32)
    h, w = image.shape[:2]
    if bool(p["downscale"]):  # a per-pixel colour map commutes with nearest down-sampling: do it small
        f = int(p["factor"])
        small = cv2.resize(image, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_NEAREST)
        return cv2.resize(cv2.transform(small, matrix), (w, h), interpolation=cv2.INTER_LINEAR)
    out = cv2.transform(image, matrix)
    alpha, light = float(p["sharpen_alpha"]), float(p["sharpen_lightness"])
    box = cv2.blur(out, (3, 3), borderType=cv2.BORDER_REFLECT_101)
    return cv2.addWeighted(out, 1.0 + alpha * (8.0 + light), box, -9.0 * alpha, 0.0)


def mask_grid_shape(h: int, w: int, stride: int) -> Tuple[int, int]:
    """Size of the coarse grid the mask is computed on (both paths)."""
    return max(2, -(-h // stride)), max(2, -(-w // stride))


@functools.lru_cache(maxsize=16)
def displacement_basis(n: int, g: int) -> np.ndarray:
    """[n, g] smooth interpolation weights (normalised Gaussian bumps at g evenly spaced control
    points): the elastic field on an n-point axis is ``B_y @ noise @ B_x.T`` (both paths)."""
    x = (np.arange(n) + 0.5) / n
    centres = np.linspace(0.0, 1.0, g)
    weights = np.exp(-0.5 * ((x[:, None] - centres[None, :]) * (g - 1) / 0.6) ** 2)
    return (weights / weights.sum(1, keepdims=True)).astype(np.float32)


def blur_radius(sigma: float) -> int:
    """Gaussian kernel radius (3 sigma, at least 1) used by both paths: the mask is exactly 0 beyond it."""
    return max(1, int(np.ceil(3.0 * sigma)))


def ellipse_coefficients(p: Dict[str, np.ndarray], h: int, w: int, gw: int) -> List:
    """The 9 per-sample coefficients of the coarse mask (floats, or arrays for a batch), shared by
    both paths: on grid column ``x`` and row ``y`` (pixel centres, 0..1) the ellipse frame is
    ``qx = c0 + c1 * x + dx``, ``qy = c2 + c3 * y + dy * h / w`` (the source's warp inverted, so
    the mask moves with the source), ``ex = c4 * qx + c5 * qy``, ``ey = c6 * qy - c7 * qx``, and
    the anti-aliased hard mask is ``clip(c8 * (1 - ex^2 - ey^2) + 0.5, 0, 1)``: a ramp of about
    one grid pixel."""
    trig = (math.cos, math.sin) if isinstance(p["angle"], float) else (np.cos, np.sin)
    theta = p["angle"] * (math.pi / 180.0)
    c, s = trig[0](theta), trig[1](theta)
    inv_s = 1.0 / p["scale"]
    half_h = p["half_h"] * (h / w)  # in units of the width, so the tilt is a true rotation
    return [0.5 - p["cx"] - (0.5 + p["tx"]) * inv_s, inv_s,
            (0.5 - p["cy"] - (0.5 + p["ty"]) * inv_s) * (h / w), inv_s * (h / w),
            c / p["half_w"], s / p["half_w"], c / half_h, s / half_h, 0.5 * p["half_w"] * gw]


@functools.lru_cache(maxsize=16)
def _centres(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.float32) + 0.5) / n


def _mask_grid(h: int, w: int, p: Dict[str, np.ndarray], stride: int) -> np.ndarray:
    """The mask on the coarse grid (float32, peak = blend ratio, exactly 0 outside its support)."""
    gh, gw = mask_grid_shape(h, w, stride)
    noise = p["displacement"].astype(np.float32)
    g = noise.shape[-1]
    dx, dy = displacement_basis(gh, g) @ noise @ displacement_basis(gw, g).T
    k = [float(v) for v in ellipse_coefficients(p, h, w, gw)]
    qx = dx + (k[0] + k[1] * _centres(gw))[None, :]
    qy = (dy * (h / w) if h != w else dy) + (k[2] + k[3] * _centres(gh))[:, None]
    ex = k[4] * qx + k[5] * qy
    ey = k[6] * qy - k[7] * qx
    ex *= ex
    ey *= ey
    ex += ey
    hard = (k[8] + 0.5) - k[8] * ex
    np.clip(hard, 0.0, 1.0, out=hard)
    sigma = float(p["blur_sigma"]) * max(gh, gw)
    if sigma > 0.05:
        r = blur_radius(sigma)
        hard = cv2.GaussianBlur(hard, (2 * r + 1, 2 * r + 1), sigma, borderType=cv2.BORDER_CONSTANT)
    peak = float(hard.max())
    if peak > 0:
        hard *= np.float32(float(p["blend_ratio"]) / peak)
    return hard


def _support(grid: np.ndarray, h: int, w: int) -> Optional[Tuple[int, int, int, int]]:
    """Full-size box (y0, y1, x0, x1) outside which the up-sampled mask is exactly 0."""
    rows, cols = np.flatnonzero(grid.any(1)), np.flatnonzero(grid.any(0))
    if rows.size == 0:
        return None
    gh, gw = grid.shape
    # Bilinear up-sampling spreads a coarse cell over its neighbours' centres: one cell of margin.
    return (max(0, (rows[0] - 1) * h // gh), min(h, -(-(rows[-1] + 2) * h // gh)),
            max(0, (cols[0] - 1) * w // gw), min(w, -(-(cols[-1] + 2) * w // gw)))


def _source_window(lo: int, hi: int, size: int, scale: float, shift: float) -> Tuple[int, int]:
    """Source pixels [start, start + n) that the warp maps onto output pixels [lo, hi)."""
    n = min(max(round((hi - lo) / scale), 1), size)
    start = round(size * (0.5 + (lo / size - 0.5 - shift) / scale))
    return min(max(start, 0), size - n), n


def _alpha_blend(source: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``mask * source + (1 - mask) * target`` in uint8 (8-bit alpha; exactly ``target`` where mask is 0)."""
    a = cv2.convertScaleAbs(mask, alpha=255.0)
    a = cv2.merge([a, a, a])
    return cv2.add(cv2.multiply(source, a, scale=1 / 255), cv2.multiply(target, cv2.bitwise_not(a), scale=1 / 255))


def apply_params(image: np.ndarray, p: Dict[str, np.ndarray], cfg: SelfBlendConfig,
                 keep_target: bool = False) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Deterministic half of `self_blend`: (pseudo-fake uint8 HxWx3, mask float32 HxW in [0, 1],
    target copy or None). With ``keep_target`` the target copy is returned too: ``image`` itself
    when the source was the transformed copy, else its transformed copy.

    Only the mask's support is warped and blended; the source's scale + translation is realised as
    a crop-and-resize (offsets rounded to whole pixels, clamped inside the image).
    """
    h, w = image.shape[:2]
    grid = _mask_grid(h, w, p, cfg.mask_stride)
    mask = cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR)
    transform_source = bool(p["transform_source"])
    target = image if transform_source else _transform_copy(image, p)
    out = target.copy() if transform_source or keep_target else target
    box = _support(grid, h, w)
    if box is not None:
        y0, y1, x0, x1 = box
        sy, nh = _source_window(y0, y1, h, float(p["scale"]), float(p["ty"]))
        sx, nw = _source_window(x0, x1, w, float(p["scale"]), float(p["tx"]))
        source = image[sy:sy + nh, sx:sx + nw]
        if transform_source:
            source = _transform_copy(np.ascontiguousarray(source), p)
        if (nh, nw) != (y1 - y0, x1 - x0):
            source = cv2.resize(source, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        out[y0:y1, x0:x1] = _alpha_blend(source, out[y0:y1, x0:x1], mask[y0:y1, x0:x1])
    return out, mask, (target if keep_target else None)


def _checked(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"self_blend: expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


def self_blend_pair(image: np.ndarray, rng: np.random.Generator,
                    cfg: SelfBlendConfig = DEFAULT_CONFIG) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(target, blended, mask)`` from one real HxWx3 uint8 RGB image (``image`` is not modified).

    ``target`` is the copy the source was blended into (``image`` or its colour/frequency
    transformed copy): SBI trains on (target as real, blended as fake) pairs, so that a global
    transform alone never marks a fake. ``mask`` is float32 HxW in [0, 1], already scaled by the
    blend ratio, and exactly 0 where ``blended`` equals ``target``. All randomness comes from ``rng``.
    """
    blended, mask, target = apply_params(_checked(image), sample_params(rng, cfg), cfg, keep_target=True)
    return target, blended, mask


KEEP, BLEND, TRANSFORM = 0, 1, 2  # what self-blending does to one real sample (`draw_choice`)


def draw_choice(rng: np.random.Generator, p: float, cfg: SelfBlendConfig = DEFAULT_CONFIG
                ) -> Tuple[int, Optional[np.ndarray], Optional[np.ndarray]]:
    """``(choice, uniforms, noise)`` of one *real* training sample at self-blending probability ``p``:
    ``BLEND`` (a pseudo-fake) with probability ``p``; ``TRANSFORM`` (the global transform of a target copy
    alone: it stays real, so a transformed image never marks a fake, as SBI's (target, blended) pairs
    ensure) with probability ``min(p, 1 - p)``; else ``KEEP``. Both paths draw here."""
    u = rng.random()
    if u >= 2 * p:
        return KEEP, None, None
    g = cfg.elastic_grid
    return (BLEND if u < p else TRANSFORM), rng.random(N_UNIFORMS), rng.standard_normal((2, g, g))


def pseudo_fake_or_real(image: np.ndarray, rng: np.random.Generator, p: float,
                        cfg: SelfBlendConfig = DEFAULT_CONFIG,
                        face_box: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, bool]:
    """One real image after `draw_choice`: its pseudo-fake (with True), its transformed copy, or itself;
    ``face_box`` (fractions of the image) places the mask on the detected face (`place_on_face`)."""
    choice, u, noise = draw_choice(rng, p, cfg)
    if choice == KEEP:
        return image, False
    params = params_from_uniforms(u, noise, cfg)
    if face_box is not None:
        params = place_on_face(params, face_box, cfg)
    if choice == BLEND:
        return apply_params(_checked(image), params, cfg)[0], True
    return (image if bool(params["transform_source"]) else _transform_copy(_checked(image), params)), False


def self_blend(image: np.ndarray, rng: np.random.Generator, cfg: SelfBlendConfig = DEFAULT_CONFIG,
               face_box: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(blended, mask)``: a pseudo-fake from one real HxWx3 uint8 RGB image; see `self_blend_pair`
    (the same draws, without keeping the target copy); ``face_box`` as in `pseudo_fake_or_real`."""
    p = sample_params(rng, cfg)
    blended, mask, _ = apply_params(_checked(image), place_on_face(p, face_box, cfg) if face_box else p, cfg)
    return blended, mask


def contact_sheet(sources: Sequence[np.ndarray], blended: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                  diff_gain: float = 4.0) -> np.ndarray:
    """An RGB uint8 [N*H, 4*W, 3] sheet, one row per sample: source | pseudo-fake | mask | |diff| x gain."""
    if len(sources) == 0:
        raise ValueError("contact_sheet: no samples given")
    return np.vstack([np.hstack([src, out, np.repeat((np.clip(mask, 0, 1) * 255 + 0.5).astype(np.uint8)[..., None], 3, 2),
                                 np.clip(np.abs(out.astype(np.int16) - src.astype(np.int16)) * diff_gain, 0, 255)
                                 .astype(np.uint8)]) for src, out, mask in zip(sources, blended, masks, strict=True)])
