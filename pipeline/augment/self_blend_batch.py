"""Self-Blended Images on a uint8 batch, on the batch's own device (the torch backend's CUDA path).

The recipe and parameter ranges of `pipeline.augment.self_blend` (the per-image uint8/OpenCV path
the CPU workers run): each sample's choice, uniforms and noise are drawn per sample with
`pipeline.augment.self_blend.draw_choice` in the workers (so the choice and label of a sample are
the same on either path) and mapped by the shared `params_from_uniforms`; the ops then run batched
in float on the device: the colour matrix as one batched matmul, down/up-sampling grouped by factor,
sharpening as grouped 3x3 convolutions, the source warp through ``grid_sample``, and the masks as a
per-sample ellipse (on the face box where the row has one) on a coarse grid plus a smooth displacement
(`displacement_basis`), a grouped per-sample Gaussian blur and a bilinear up-sampling. The two paths
are not bit-identical (rounding, sub-pixel warp instead of whole-pixel offsets, float instead of 8-bit
alpha), and this one blends the batch at its output size where the workers blend the decoded image at
its native size (the mask's geometry is relative to the image, so both draw the same mask shape).

A table row per sample (`choice_table`): column 0 the choice (``KEEP``/``BLEND``/``TRANSFORM``), then
the ``N_UNIFORMS`` uniforms, then the ``2 * g * g`` normals (``KEEP`` rows: zeros), then the face-stage box
(x0, y0, x1, y1 as fractions of the image, ``--sbi-mask face``; NaN where a sample has none): a row with a
box gets its mask placed on the face (`pipeline.augment.face_mask.place_on_face`) as the workers' path does.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.augment.face_mask import place_on_face
from pipeline.augment.self_blend import (
    BLEND,
    DEFAULT_CONFIG,
    KEEP,
    N_UNIFORMS,
    SelfBlendConfig,
    blur_radius,
    colour_matrix,
    displacement_basis,
    draw_choice,
    ellipse_coefficients,
    mask_grid_shape,
    params_from_uniforms,
    sharpen_kernel,
)


BOX_COLUMNS = 4  # the face box at the end of a table row
# the columns of a row (any table width): uniforms, the normals of the mask's displacement, the face box
UNIFORMS, NOISE, BOX = slice(1, 1 + N_UNIFORMS), slice(1 + N_UNIFORMS, -BOX_COLUMNS), slice(-BOX_COLUMNS, None)


def table_width(cfg: SelfBlendConfig = DEFAULT_CONFIG) -> int:
    return 1 + N_UNIFORMS + 2 * cfg.elastic_grid ** 2 + BOX_COLUMNS


def keep_table(n: int, cfg: SelfBlendConfig = DEFAULT_CONFIG) -> np.ndarray:
    """[n, `table_width`] rows that leave their samples alone (``KEEP``, no face box)."""
    table = np.zeros((n, table_width(cfg)))
    table[:, BOX] = np.nan
    return table


def choice_table(rngs: List[np.random.Generator], p: float, cfg: SelfBlendConfig = DEFAULT_CONFIG,
                 boxes: Optional[Sequence[Optional[Tuple[float, float, float, float]]]] = None) -> np.ndarray:
    """[N, `table_width`] float64: one `draw_choice` per generator (one per real sample) and its face box
    (``boxes[i]``, fractions of the image; None or no ``boxes``: the default mask)."""
    table = keep_table(len(rngs), cfg)
    for i, rng in enumerate(rngs):
        choice, u, noise = draw_choice(rng, p, cfg)
        if choice != KEEP:
            table[i, 0], table[i, UNIFORMS], table[i, NOISE] = choice, u, noise.ravel()
        if boxes is not None and boxes[i] is not None:
            table[i, BOX] = boxes[i]
    return table


def params_from_table(table: np.ndarray, cfg: SelfBlendConfig = DEFAULT_CONFIG) -> Dict[str, np.ndarray]:
    """The blend parameters of ``table``'s rows (`params_from_uniforms`), each mask moved onto its row's face
    box where it has one."""
    g = cfg.elastic_grid
    p = params_from_uniforms(table[:, UNIFORMS], table[:, NOISE].reshape(-1, 2, g, g), cfg)
    boxes = table[:, BOX]
    on_face = np.isfinite(boxes).all(1)
    if on_face.any():
        placed = place_on_face(p, boxes.T, cfg)
        for k in ("cx", "cy", "half_w", "half_h"):
            p[k] = np.where(on_face, placed[k], p[k])
    return p


def _tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(device)


def transform_copies(x: torch.Tensor, p: Dict[str, np.ndarray]) -> torch.Tensor:
    """Colour then frequency transform of float NCHW 0..255 ``x`` (one parameter row per sample)."""
    n, c, h, w = x.shape
    m = _tensor(colour_matrix(p), x.device)
    y = torch.baddbmm(m[:, :, 3:], m[:, :, :3], x.reshape(n, c, h * w)).reshape(n, c, h, w).clamp_(0, 255)
    down, factor = p["downscale"], p["factor"]
    for f in np.unique(factor[down]):
        idx = torch.from_numpy(np.flatnonzero(down & (factor == f))).to(x.device)
        small = F.interpolate(y[idx], size=(max(1, h // int(f)), max(1, w // int(f))), mode="nearest")
        y[idx] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    sharp = np.flatnonzero(~down)
    if sharp.size:
        pairs = zip(p["sharpen_alpha"][sharp], p["sharpen_lightness"][sharp], strict=True)
        kernels = np.stack([sharpen_kernel(alpha, light) for alpha, light in pairs])
        weight = _tensor(np.repeat(kernels, c, 0), x.device)[:, None]
        idx = torch.from_numpy(sharp).to(x.device)
        padded = F.pad(y[idx].reshape(1, len(sharp) * c, h, w), (1, 1, 1, 1), mode="reflect")
        y[idx] = F.conv2d(padded, weight, groups=len(sharp) * c).reshape(len(sharp), c, h, w)
    return y.clamp_(0, 255)


def warp_sources(x: torch.Tensor, p: Dict[str, np.ndarray]) -> torch.Tensor:
    """Scale + translate each source about the centre (bilinear, reflected border)."""
    n, _, h, w = x.shape
    inv_s = _tensor(1.0 / p["scale"], x.device)[:, None, None]
    tx, ty = (_tensor(2 * p[k], x.device)[:, None, None] for k in ("tx", "ty"))
    xs = ((2 * torch.arange(w, device=x.device, dtype=torch.float32) + 1) / w - 1)[None, None, :]
    ys = ((2 * torch.arange(h, device=x.device, dtype=torch.float32) + 1) / h - 1)[None, :, None]
    grid = torch.stack([((xs - tx) * inv_s).expand(n, h, w), ((ys - ty) * inv_s).expand(n, h, w)], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _blur_masks(hard: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """Per-sample separable Gaussian blur of [n, gh, gw] (zero border, 3-sigma taps like the uint8 path)."""
    radii = np.array([blur_radius(s) if s > 0.05 else 0 for s in sigma])
    r = int(radii.max())
    if r == 0:
        return hard
    taps = np.arange(-r, r + 1)[None, :]
    safe = np.maximum(sigma, 1e-6)[:, None]
    kernel = np.exp(-0.5 * (taps / safe) ** 2) * (np.abs(taps) <= radii[:, None])
    kernel[radii == 0] = (taps == 0)
    kernel = _tensor(kernel / kernel.sum(1, keepdims=True), hard.device)
    n = hard.shape[0]
    out = F.conv2d(hard[None], kernel[:, None, :, None], padding=(r, 0), groups=n)
    return F.conv2d(out, kernel[:, None, None, :], padding=(0, r), groups=n)[0]


def masks_for(p: Dict[str, np.ndarray], h: int, w: int, stride: int, device: torch.device) -> torch.Tensor:
    """[n, h, w] float32 blend masks (peak = blend ratio), the recipe of `pipeline.augment.self_blend`."""
    gh, gw = mask_grid_shape(h, w, stride)
    g = p["displacement"].shape[-1]
    noise = _tensor(p["displacement"] * np.array([1.0, h / w])[:, None, None], device)
    disp = _tensor(displacement_basis(gh, g), device) @ noise @ _tensor(displacement_basis(gw, g), device).T
    k = _tensor(np.stack(ellipse_coefficients(p, h, w, gw), -1), device)[:, :, None, None]
    xs = ((torch.arange(gw, device=device, dtype=torch.float32) + 0.5) / gw)[None, None, :]
    ys = ((torch.arange(gh, device=device, dtype=torch.float32) + 0.5) / gh)[None, :, None]
    qx = disp[:, 0] + k[:, 0] + k[:, 1] * xs
    qy = disp[:, 1] + k[:, 2] + k[:, 3] * ys
    ex, ey = k[:, 4] * qx + k[:, 5] * qy, k[:, 6] * qy - k[:, 7] * qx
    hard = (k[:, 8] + 0.5 - k[:, 8] * (ex * ex + ey * ey)).clamp_(0, 1)
    soft = _blur_masks(hard, p["blur_sigma"] * max(gh, gw))
    peak = soft.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    soft = soft * (_tensor(p["blend_ratio"], device)[:, None, None] / peak)
    return F.interpolate(soft[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]


def blend_batch(images: torch.Tensor, table: torch.Tensor, cfg: SelfBlendConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """Apply each row's choice (`choice_table`) to uint8 NCHW ``images`` on their device: ``BLEND`` rows
    become pseudo-fakes, ``TRANSFORM`` rows their transformed target copy, ``KEEP`` rows stay as they
    are. Returns a new uint8 batch (``images`` is not modified)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"blend_batch: expected a uint8 N x 3 x H x W batch, got {images.dtype} {tuple(images.shape)}")
    table = np.asarray(table.cpu() if isinstance(table, torch.Tensor) else table, dtype=np.float64)
    if table.shape != (images.shape[0], table_width(cfg)):
        raise ValueError(f"blend_batch: a [{images.shape[0]}, {table_width(cfg)}] choice table expected, "
                         f"got {table.shape}")
    choice = table[:, 0].round().astype(np.int64)
    rows = np.flatnonzero(choice != KEEP)
    if rows.size == 0:
        return images.clone()
    p = params_from_table(table[rows], cfg)
    device, (_, _, h, w) = images.device, images.shape
    idx = torch.from_numpy(rows).to(device)
    original = images[idx].float()
    transformed = transform_copies(original, p)
    on_source = torch.from_numpy(np.asarray(p["transform_source"], dtype=bool)).to(device)[:, None, None, None]
    target = torch.where(on_source, original, transformed)  # the copy blended into
    source = torch.where(on_source, transformed, original)
    blended = torch.lerp(target, warp_sources(source, p), masks_for(p, h, w, cfg.mask_stride, device)[:, None])
    is_blend = torch.from_numpy(choice[rows] == BLEND).to(device)[:, None, None, None]
    out = torch.where(is_blend, blended, target).round_().clamp_(0, 255).to(torch.uint8)
    return images.index_put((idx,), out)
