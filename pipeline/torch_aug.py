"""Per-sample augmentation of a uint8 NCHW batch on its own device, in float (the GPU path).

The torchvision backend's "processing" half on CUDA: `pipeline.loader_torch`'s workers decode and
resize to uint8 and draw each sample's parameters (`draw_params`, from an explicitly seeded CPU
`torch.Generator`, so the same seed gives the same augmentation on CPU and CUDA); `apply_params` then
runs on the GPU. On a CPU the workers apply the very same parameters themselves, in uint8
(`pipeline.cpu_aug`); the two agree within one 8-bit level. Every random parameter is drawn per
sample (torchvision v2 on a batched tensor would draw one set for the whole batch).

Order, per sample: resize to ``image_size`` (antialias, uint8) -> [gated by ``apply_prob``: flips,
rotation, shear and scale composed into one affine warp (torchvision ``RandomAffine`` conventions:
about the centre, shear in degrees, zero fill), brightness] -> Gaussian blur -> JPEG re-compression
-> normalise. Blur and JPEG come last because they model what sharing a finished image does to it:
a JPEG grid that was then rotated would not look like the 8x8 blocks a detector meets in the wild.
JPEG re-compression on CUDA is nvJPEG, batched per quality: nearly free.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from pipeline.augment import AugConfig, normalize_, resize_uint8


@dataclass
class AugParams:
    """Per-sample parameters of one batch (CPU tensors of length N).

    ``apply`` gates the geometric + brightness block; ``blur``/``jpeg`` gate their ops.
    Angles and shears are in degrees, ``hflip``/``vflip`` are bools.
    """

    apply: torch.Tensor
    hflip: torch.Tensor
    vflip: torch.Tensor
    angle: torch.Tensor
    shear_x: torch.Tensor
    shear_y: torch.Tensor
    scale: torch.Tensor
    brightness: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    jpeg: torch.Tensor
    quality: torch.Tensor


def params_to_tensor(params: AugParams) -> torch.Tensor:
    """One [N, K] float64 tensor of the fields (in declaration order): easy to slice, concatenate and
    send between processes."""
    return torch.stack([getattr(params, f.name).double() for f in dataclasses.fields(AugParams)], 1)


def params_from_tensor(table: torch.Tensor) -> AugParams:
    """Inverse of `params_to_tensor` (flags back to bool, quality to int64)."""
    cols = {f.name: table[:, i] for i, f in enumerate(dataclasses.fields(AugParams))}
    for name in ("apply", "hflip", "vflip", "blur", "jpeg"):
        cols[name] = cols[name] != 0
    cols["quality"] = cols["quality"].round().long()
    return AugParams(**cols)


def _uniform(n: int, rng: tuple, generator: torch.Generator) -> torch.Tensor:
    lo, hi = float(rng[0]), float(rng[1])
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def draw_params(n: int, cfg: AugConfig, generator: torch.Generator) -> AugParams:
    """Draw the parameters of ``n`` samples. Always draws every field in the same order, so the
    stream of random numbers does not depend on which ops are switched on."""
    if generator.device.type != "cpu":
        raise ValueError(f"augmentation generator must be a CPU torch.Generator, got one on {generator.device}")
    rand = lambda: torch.rand(n, generator=generator, dtype=torch.float64)  # noqa: E731
    apply = rand() < cfg.apply_prob
    hflip = rand() < cfg.hflip
    vflip = rand() < cfg.vflip
    angle = _uniform(n, (-cfg.rotate, cfg.rotate), generator)
    shear_x = _uniform(n, cfg.shear_x, generator)
    shear_y = _uniform(n, cfg.shear_y, generator)
    scale = _uniform(n, cfg.scale, generator)
    brightness = _uniform(n, cfg.brightness, generator)
    blur = rand() < cfg.blur_prob
    sigma = _uniform(n, cfg.blur_sigma, generator)
    jpeg = rand() < cfg.jpeg_prob
    quality = torch.randint(int(cfg.jpeg_quality[0]), int(cfg.jpeg_quality[1]) + 1, (n,), generator=generator)
    return AugParams(apply, hflip, vflip, angle, shear_x, shear_y, scale, brightness, blur, sigma, jpeg, quality)


def inverse_affine(angle: torch.Tensor, shear_x: torch.Tensor, shear_y: torch.Tensor, scale: torch.Tensor,
                   hflip: torch.Tensor, vflip: torch.Tensor) -> torch.Tensor:
    """[N, 2, 2] output->input maps in centred pixel coordinates.

    The rotation/scale/shear part is torchvision's ``_get_inverse_affine_matrix`` (centre at the
    image centre, no translation), vectorised; the flips are applied to the image *before* the
    affine (as ``Compose([RandomHorizontalFlip, RandomVerticalFlip, RandomAffine])``), so the
    inverse map is ``Flip @ RSS^-1``.
    """
    rot = torch.deg2rad(angle.double())
    sx = torch.deg2rad(shear_x.double())
    sy = torch.deg2rad(shear_y.double())
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / scale.double().view(-1, 1, 1)
    flip = torch.ones(angle.shape[0], 2, 1, dtype=torch.float64)
    flip[hflip.bool(), 0] = -1.0
    flip[vflip.bool(), 1] = -1.0
    return flip * inv


def warp(images: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Apply per-sample [N, 2, 2] inverse maps (centred pixel coordinates) to float NCHW images,
    bilinear, zero outside the input - exactly torchvision's tensor ``affine`` grid, per sample."""
    n, _, h, w = images.shape
    # From centred pixels to affine_grid's normalised coordinates (align_corners=False).
    to_norm = torch.tensor([2.0 / w, 2.0 / h], dtype=torch.float64).view(1, 2, 1)
    from_norm = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64).view(1, 1, 2)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, :, :2] = to_norm * inv * from_norm
    theta = theta.to(device=images.device, dtype=images.dtype)
    return F.grid_sample(images, affine_grid(theta, h, w), mode="bilinear", padding_mode="zeros", align_corners=False)


def affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, [N, C, h, w], align_corners=False)`` as two broadcast multiply-adds
    (the generic version builds a [N, h*w, 3] base grid and a bmm: about 2x slower on CPU)."""
    xs = (torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1
    row = theta[:, None, None, :, 0] * xs.view(1, 1, w, 1) + theta[:, None, None, :, 2]  # [N, 1, w, 2]
    return theta[:, None, None, :, 1] * ys.view(1, h, 1, 1) + row  # [N, h, w, 2]


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur float NCHW images, each with its own sigma (pixels), separable, reflect padding.

    One kernel width for the batch (``2 * ceil(3 * max sigma) + 1``, torchvision/DALI's usual
    3-sigma window); each sample's taps come from its own sigma, so a sample equals
    ``torchvision.transforms.v2.functional.gaussian_blur`` with that kernel size and sigma.
    """
    n, ch, h, w = images.shape
    radius = max(1, min(int(math.ceil(3.0 * float(sigma.max()))), h - 1, w - 1))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    s = sigma.double().clamp_min(1e-3).view(-1, 1)
    kernel = torch.exp(-0.5 * (x.view(1, -1) / s) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(device=images.device, dtype=images.dtype)
    kernel = kernel.repeat_interleave(ch, 0)  # [N*C, K]: one row per (sample, channel)
    k = kernel.shape[1]
    flat = images.reshape(1, n * ch, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(n * ch, 1, 1, k), groups=n * ch)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(n * ch, 1, k, 1), groups=n * ch)
    return flat.view(n, ch, h, w)


def jpeg_roundtrip(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Re-compress each uint8 CHW image of ``images`` at its own JPEG quality; same device out."""
    out = torch.empty_like(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
        if images.device.type == "cuda":
            # nvJPEG encodes a list in one call, at one quality: group the samples by quality.
            for q in torch.unique(quality).tolist():
                idx = (quality == q).nonzero().flatten().tolist()
                encoded = encode_jpeg([images[i].contiguous() for i in idx], quality=int(q))
                decoded = decode_jpeg([e.cpu() for e in encoded], mode=ImageReadMode.RGB, device=images.device)
                for i, img in zip(idx, decoded):
                    out[i] = img
        else:
            for i in range(images.shape[0]):
                data = encode_jpeg(images[i].contiguous(), quality=int(quality[i]))
                out[i] = decode_jpeg(data, mode=ImageReadMode.RGB)
    return out


def apply_params(images: torch.Tensor, params: AugParams, image_size: int) -> torch.Tensor:
    """Augment uint8 NCHW ``images`` with ``params``; returns float32 0..255 NCHW at ``image_size``."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a uint8 N x 3 x H x W batch, got {images.dtype} {tuple(images.shape)}")
    if params.apply.shape[0] != images.shape[0]:
        raise ValueError(f"{params.apply.shape[0]} parameter sets for a batch of {images.shape[0]}")
    device = images.device
    x = resize_uint8(images, image_size).float()

    sel = params.apply.nonzero().flatten()
    if sel.numel():
        idx = sel.to(device)
        sub = x.index_select(0, idx)
        inv = inverse_affine(params.angle[sel], params.shear_x[sel], params.shear_y[sel], params.scale[sel],
                             params.hflip[sel], params.vflip[sel])
        if not torch.equal(inv, torch.eye(2, dtype=inv.dtype).expand_as(inv)):
            sub = warp(sub, inv)
        factor = params.brightness[sel].to(device=device, dtype=x.dtype).view(-1, 1, 1, 1)
        x.index_copy_(0, idx, sub.mul_(factor).clamp_(0.0, 255.0))

    sel = params.blur.nonzero().flatten()
    if sel.numel():
        idx = sel.to(device)
        x.index_copy_(0, idx, gaussian_blur(x.index_select(0, idx), params.sigma[sel]))

    sel = params.jpeg.nonzero().flatten()
    if sel.numel():
        idx = sel.to(device)
        rounded = x.index_select(0, idx).round_().clamp_(0, 255).to(torch.uint8)
        x.index_copy_(0, idx, jpeg_roundtrip(rounded, params.quality[sel]).float())
    return x


def augment_batch(images: torch.Tensor, cfg: AugConfig, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 NCHW batch (any device) -> float32 normalised NCHW ``image_size`` square, same device:
    `draw_params` + `apply_params` + normalise in one call.

    Parameters are drawn per sample from ``generator`` (a CPU generator, seeded by the caller).
    With ``cfg.is_identity`` this is exactly ``normalize(resize_uint8(images, image_size))`` and
    draws nothing.
    """
    if cfg.is_identity:
        if images.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 batch, got {images.dtype}")
        return normalize_(resize_uint8(images, image_size).float())
    params = draw_params(images.shape[0], cfg, generator)
    return normalize_(apply_params(images, params, image_size))
