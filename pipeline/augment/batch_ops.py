"""Augmentation and normalisation of uint8/float NCHW tensors on their device (the GPU path).

`apply_params` applies per-sample `pipeline.augment.params.AugParams` to a whole batch: one affine
grid per sample, brightness, blur, JPEG re-compression (nvJPEG on CUDA). `normalize`/`normalize_`
and `resize_uint8` are the eval preprocessing shared by every path that bypasses the loaders."""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from pipeline.augment.config import DEFAULT_NORM, Norm
from pipeline.augment.params import AugParams, inverse_affine


def normalize(images: torch.Tensor, norm: Norm = DEFAULT_NORM) -> torch.Tensor:
    """uint8 (0..255) NCHW RGB -> float32 normalised with ``norm`` (mean, std), on the input's device."""
    if images.dtype != torch.uint8:
        raise ValueError(f"normalize expects a uint8 batch, got {images.dtype}")
    return normalize_(images.float(), norm)


def normalize_(x: torch.Tensor, norm: Norm = DEFAULT_NORM) -> torch.Tensor:
    """In place on float 0..255 NCHW: ``(x / 255 - mean) / std`` as one multiply and one add.

    Two in-place ops instead of four allocating ones: about 3x faster on a CPU, where this is
    a visible share of a loader's cost.
    """
    std = torch.tensor(norm[1], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    mean = torch.tensor(norm[0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return x.mul_(1.0 / (255.0 * std)).add_(-mean / std)


def resize_uint8(image: torch.Tensor, size: int) -> torch.Tensor:
    """The eval resize, shared by every path that bypasses the loaders (folders, predict).

    ``image`` is uint8 CHW (or NCHW); returns uint8 of ``size x size``, bilinear with antialias,
    aspect ratio not kept (face crops are square), as torchvision/DALI resize do.
    """
    from torchvision.transforms.v2 import functional as F

    if image.shape[-2:] == (size, size):
        return image
    return F.resize(image, [size, size], interpolation=F.InterpolationMode.BILINEAR, antialias=True)


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
