"""Per-sample augmentation of a uint8 NCHW batch on its own device, in float (the GPU path).

The torchvision backend's "processing" half on CUDA: `pipeline.data.torch_backend`'s workers decode and
resize to uint8 and draw each sample's parameters (`draw_params`, from an explicitly seeded CPU
`torch.Generator`, so the same seed gives the same augmentation on CPU and CUDA); `apply_params` then
runs on the GPU. On a CPU the workers apply the very same parameters themselves, in uint8
(`pipeline.augment.uint8_ops`); the two agree within one 8-bit level. Every random parameter is drawn per
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
from dataclasses import dataclass

import torch

from pipeline.augment.config import AugConfig

N_INTERPOLATIONS = 4  # area, bilinear, bicubic, Lanczos: see uint8_ops.DOWNSCALE_INTERPOLATIONS


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
    down: torch.Tensor  # crop mode: down-scale the whole image first (bool)
    factor: torch.Tensor  # its factor
    interp: torch.Tensor  # its interpolation, an index into uint8_ops.DOWNSCALE_INTERPOLATIONS
    crop_y: torch.Tensor  # crop mode, training: where the crop starts, as a fraction of the free range
    crop_x: torch.Tensor


def params_to_tensor(params: AugParams) -> torch.Tensor:
    """One [N, K] float64 tensor of the fields (in declaration order): easy to slice, concatenate and
    send between processes."""
    return torch.stack([getattr(params, f.name).double() for f in dataclasses.fields(AugParams)], 1)


def params_from_tensor(table: torch.Tensor) -> AugParams:
    """Inverse of `params_to_tensor` (flags back to bool, quality to int64)."""
    cols = {f.name: table[:, i] for i, f in enumerate(dataclasses.fields(AugParams))}
    for name in ("apply", "hflip", "vflip", "blur", "jpeg", "down"):
        cols[name] = cols[name] != 0
    for name in ("quality", "interp"):
        cols[name] = cols[name].round().long()
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
    down = rand() < cfg.downscale_prob
    factor = _uniform(n, cfg.downscale, generator)
    interp = torch.randint(0, N_INTERPOLATIONS, (n,), generator=generator)
    crop_y, crop_x = rand(), rand()
    return AugParams(apply, hflip, vflip, angle, shear_x, shear_y, scale, brightness, blur, sigma, jpeg, quality,
                     down, factor, interp, crop_y, crop_x)


def crop_offset(free: int, fraction: float) -> int:
    """An even offset in ``[0, free]`` at ``fraction`` (in [0, 1)) of the range; the centre for None.

    Even, so that a crop keeps the 2x2 grid of the full image (NPR's residual, up-sampling traces)."""
    if free <= 0:
        return 0
    slots = free // 2 + 1
    return 2 * (slots // 2 if fraction is None else min(slots - 1, int(fraction * slots)))


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
