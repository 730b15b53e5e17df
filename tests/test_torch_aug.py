"""pipeline.augment.params: per-sample augmentation on the batch, checked against torchvision's own ops."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from helpers import make_face
from torchvision.transforms.v2 import functional as TF

from pipeline.augment.batch_ops import (
    affine_grid,
    apply_params,
    gaussian_blur,
    jpeg_roundtrip,
    normalize,
    normalize_,
    resize_uint8,
    warp,
)
from pipeline.augment.config import MEAN, STD, AugConfig
from pipeline.augment.params import draw_params, inverse_affine


def augment_batch(images: torch.Tensor, cfg: AugConfig, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """What the torch backend does on CUDA: draw per-sample parameters, apply them, normalise."""
    if cfg.is_identity:
        if images.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 batch, got {images.dtype}")
        return normalize_(resize_uint8(images, image_size).float())
    return normalize_(apply_params(images, draw_params(images.shape[0], cfg, generator), image_size))


LOW = min((0 - m) / s for m, s in zip(MEAN, STD))
HIGH = max((1 - m) / s for m, s in zip(MEAN, STD))


def faces(n: int, size: int = 40, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.stack([torch.from_numpy(make_face(rng, size, fake=i % 2 == 1)).permute(2, 0, 1) for i in range(n)])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("size", [40, 32, 56])
def test_eval_path_is_resize_and_normalize(size):
    x = faces(4)
    out = augment_batch(x, AugConfig.preset("none"), size, gen())
    assert out.dtype == torch.float32 and out.shape == (4, 3, size, size)
    assert torch.equal(out, normalize(resize_uint8(x, size)))


def test_warp_matches_torchvision_affine_per_sample():
    x = faces(3).float()
    angle = torch.tensor([30.0, -12.5, 0.0])
    shear_x = torch.tensor([0.0, 1.1, 10.0])
    shear_y = torch.tensor([0.0, 0.8, -5.0])
    scale = torch.tensor([1.0, 1.2, 0.8])
    no = torch.zeros(3, dtype=torch.bool)
    out = warp(x, inverse_affine(angle, shear_x, shear_y, scale, no, no))
    for i in range(3):
        ref = TF.affine(x[i], angle=float(angle[i]), translate=[0, 0], scale=float(scale[i]),
                        shear=[float(shear_x[i]), float(shear_y[i])], interpolation=TF.InterpolationMode.BILINEAR)
        assert torch.allclose(out[i], ref, atol=0.01), i


def test_affine_grid_equals_torch_affine_grid():
    theta = torch.randn(5, 2, 3, generator=gen(1))
    ref = torch.nn.functional.affine_grid(theta, [5, 3, 24, 40], align_corners=False)
    assert torch.allclose(affine_grid(theta, 24, 40), ref, atol=1e-5)


def test_flips_compose_into_the_warp():
    x = faces(3).float()
    zero, one = torch.zeros(3), torch.ones(3)
    hflip = torch.tensor([True, False, True])
    vflip = torch.tensor([False, True, True])
    out = warp(x, inverse_affine(zero, zero, zero, one, hflip, vflip))
    assert torch.allclose(out[0], x[0].flip(-1), atol=1e-3)
    assert torch.allclose(out[1], x[1].flip(-2), atol=1e-3)
    assert torch.allclose(out[2], x[2].flip(-1).flip(-2), atol=1e-3)
    # flip first, then rotate: as Compose([RandomHorizontalFlip, RandomAffine])
    rot = warp(x[:1], inverse_affine(torch.tensor([20.0]), zero[:1], zero[:1], one[:1], hflip[:1], vflip[:1]))
    ref = TF.affine(x[0].flip(-1), angle=20.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0],
                    interpolation=TF.InterpolationMode.BILINEAR)
    assert torch.allclose(rot[0], ref, atol=0.01)


def test_blur_matches_torchvision_per_sample_sigma():
    x = faces(3).float()
    sigma = torch.tensor([0.4, 1.0, 2.0])
    out = gaussian_blur(x, sigma)
    k = 2 * math.ceil(3 * 2.0) + 1  # one kernel width for the batch, from the largest sigma
    for i in range(3):
        ref = TF.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2)
        assert torch.allclose(out[i], ref, atol=1e-3), i
    assert not torch.allclose(out[0], out[2], atol=1.0)


def test_jpeg_roundtrip_uses_each_samples_quality():
    from torchvision.io import decode_jpeg, encode_jpeg

    x = faces(2)
    q = torch.tensor([20, 95])
    out = jpeg_roundtrip(x, q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for i in range(2):
            assert torch.equal(out[i], decode_jpeg(encode_jpeg(x[i], quality=int(q[i]))))
    err = [(out[i].float() - x[i].float()).abs().mean() for i in range(2)]
    assert err[0] > err[1] > 0


def test_per_sample_randomness_on_identical_images():
    x = faces(1).repeat(8, 1, 1, 1)
    out = augment_batch(x, AugConfig.preset("robust", apply_prob=1.0), 40, gen(3))
    flat = out.flatten(1)
    distinct = {tuple(torch.round(row[:200] * 1000).tolist()) for row in flat}
    assert len(distinct) == 8, "samples of one batch got the same transform"


def test_same_seed_same_output_other_seed_differs():
    x = faces(6)
    cfg = AugConfig.preset("robust")
    a = augment_batch(x, cfg, 32, gen(1))
    b = augment_batch(x, cfg, 32, gen(1))
    c = augment_batch(x, cfg, 32, gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_apply_prob_gates_geometry_and_brightness():
    x = faces(6)
    ident = normalize(resize_uint8(x, 40))
    off = augment_batch(x, AugConfig.preset("seed", apply_prob=0.0), 40, gen())
    assert torch.equal(off, ident)
    params = draw_params(6, AugConfig.preset("seed"), gen(5))
    assert 0 < int(params.apply.sum()) < 6, "pick a seed that gates some samples on and some off"
    out = apply_params(x, params, 40)
    for i in range(6):
        same = torch.equal(out[i], x[i].float())
        assert same != bool(params.apply[i]), i


def test_brightness_only_scales_and_clamps():
    x = faces(2)
    cfg = AugConfig(brightness=(1.5, 1.5))
    out = apply_params(x, draw_params(2, cfg, gen()), 40)
    assert torch.allclose(out, (x.float() * 1.5).clamp(0, 255))


def test_robust_output_dtype_shape_range():
    x = faces(8, size=48)
    out = augment_batch(x, AugConfig.preset("robust"), 32, gen())
    assert out.dtype == torch.float32 and out.shape == (8, 3, 32, 32)
    assert torch.isfinite(out).all()
    assert out.min() >= LOW - 1e-4 and out.max() <= HIGH + 1e-4


def test_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        augment_batch(faces(2).float(), AugConfig.preset("seed"), 32, gen())
    with pytest.raises(ValueError, match="uint8"):
        augment_batch(faces(2).float(), AugConfig.preset("none"), 32, gen())


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = faces(8, size=48)
    cfg = AugConfig.preset("seed", apply_prob=1.0, blur_prob=1.0)
    cpu = augment_batch(x, cfg, 32, gen(7))
    gpu = augment_batch(x.cuda(), cfg, 32, gen(7))
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-3)
    robust = augment_batch(x.cuda(), AugConfig.preset("robust", jpeg_prob=1.0), 32, gen(7))
    assert robust.device.type == "cuda" and robust.shape == (8, 3, 32, 32) and torch.isfinite(robust).all()
