"""pipeline.augment.uint8_ops: the workers' uint8 path gives what the float batch path (pipeline.augment.params) gives."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch
from helpers import make_face

from pipeline.augment import uint8_ops
from pipeline.augment.batch_ops import apply_params, normalize, resize_uint8
from pipeline.augment.config import AugConfig
from pipeline.augment.params import draw_params, params_from_tensor, params_to_tensor


def faces_hwc(n: int, size: int = 40, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [make_face(rng, size, fake=i % 2 == 1) for i in range(n)]


def run(images: list, params, size: int) -> np.ndarray:
    out = np.zeros((len(images), size, size, 3), np.uint8)
    uint8_ops.process_into(images, out, params)
    return out


def reference(images: list, params, size: int) -> np.ndarray:
    """pipeline.augment.params on the same images and parameters, rounded back to uint8 HWC."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return apply_params(batch, params, size).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("src,size", [(40, 40), (40, 32), (40, 56), (64, 24)])
def test_resize_is_the_eval_resize_bit_for_bit(src, size):
    images = faces_hwc(3, src)
    out = run(images, None, size)
    ref = resize_uint8(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), size)
    assert np.array_equal(out, ref.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("size", [40, 32])
def test_geometric_and_brightness_match_the_batch_path(size):
    images = faces_hwc(8, 40, seed=1)
    params = draw_params(8, AugConfig.preset("seed", apply_prob=1.0), torch.Generator().manual_seed(3))
    out, ref = run(images, params, size), reference(images, params, size)
    diff = np.abs(out.astype(int) - ref.astype(int))
    # OpenCV warps in fixed point and rounds brightness to uint8; grid_sample is float: one level apart
    assert diff.max() <= 1 and diff.mean() < 0.3
    plain = run(images, None, size)
    assert all(np.abs(out[i].astype(int) - plain[i]).mean() > 2 for i in range(8))  # really augmented


def test_fixed_flip_is_exact():
    images = faces_hwc(2, 32)
    cfg = AugConfig(hflip=1.0)
    params = draw_params(2, cfg, torch.Generator().manual_seed(0))
    out = run(images, params, 32)
    assert np.array_equal(out, np.stack(images)[:, :, ::-1])


def test_per_sample_parameters_and_untouched_samples():
    images = [faces_hwc(1, 40, seed=5)[0]] * 6  # the same image six times
    params = draw_params(6, AugConfig.preset("seed", apply_prob=0.5), torch.Generator().manual_seed(11))
    out = run(images, params, 40)
    applied = params.apply.tolist()
    assert 0 < sum(applied) < 6
    for i in range(6):
        assert np.array_equal(out[i], images[i]) != applied[i]  # not applied: the image as it was
    augmented = [out[i] for i in range(6) if applied[i]]
    assert len({a.tobytes() for a in augmented}) == len(augmented)  # each its own transform


def test_blur_and_jpeg_change_pixels_like_the_batch_path():
    images = faces_hwc(4, 48, seed=2)
    cfg = AugConfig(blur_prob=1.0, blur_sigma=(1.0, 2.0))
    params = draw_params(4, cfg, torch.Generator().manual_seed(0))
    diff = np.abs(run(images, params, 48).astype(int) - reference(images, params, 48).astype(int))
    assert diff.max() <= 2  # OpenCV's fixed-point separable filter vs a float conv
    cfg = AugConfig(jpeg_prob=1.0, jpeg_quality=(20, 20))
    params = draw_params(4, cfg, torch.Generator().manual_seed(0))
    out = run(images, params, 48)
    err = np.abs(out.astype(int) - np.stack(images)).mean()
    assert 0.5 < err < 12  # visibly recompressed, still the same picture


def test_normalize_hwc_matches_normalize():
    batch = torch.from_numpy(np.stack(faces_hwc(3, 24)))
    out = uint8_ops.normalize_hwc(batch)
    ref = normalize(batch.permute(0, 3, 1, 2).contiguous())
    assert out.shape == (3, 3, 24, 24) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, ref, atol=1e-5)
    with pytest.raises(ValueError, match="uint8 N x H x W x 3"):
        uint8_ops.normalize_hwc(batch.permute(0, 3, 1, 2))


def test_params_tensor_round_trip():
    params = draw_params(5, AugConfig.preset("robust"), torch.Generator().manual_seed(4))
    back = params_from_tensor(params_to_tensor(params))
    for field in dataclasses.fields(params):
        assert torch.equal(getattr(back, field.name), getattr(params, field.name)), field.name


def test_decode_rgb_and_garbage():
    image = faces_hwc(1, 32)[0]
    ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok and np.array_equal(uint8_ops.decode(png.tobytes()), image)  # RGB order, lossless
    assert uint8_ops.decode(b"not an image at all") is None


def test_buffer_pool_reuses_a_block_only_when_nothing_references_it():
    pool = uint8_ops.BufferPool(capacity=2)
    a = pool.empty((2, 4, 4, 3))
    a.fill_(1.0)
    view = a[0]  # a view keeps the block: it must not be handed out again
    del a
    b = pool.empty((2, 4, 4, 3))
    assert b.data_ptr() != view.data_ptr() and torch.all(view == 1.0)
    b_ptr = b.data_ptr()
    del b
    assert pool.empty((2, 4, 4, 3)).data_ptr() == b_ptr  # released: reused
    del view
    assert len(pool.blocks) == 2
    big = pool.empty((3, 4, 4, 3))  # larger than both blocks, pool full: a plain tensor
    assert big.shape == (3, 4, 4, 3) and all(big.data_ptr() != blk[0].ctypes.data for blk in pool.blocks)
