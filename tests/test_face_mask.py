"""Face-aware self-blending: the blend mask follows the face stage's detector box, the ellipse stays the
fallback, and the torch loader reads the box from each sample's json."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.augment.face_mask import face_box_in_crop, place_on_face, sample_face_box
from pipeline.augment.self_blend import DEFAULT_CONFIG, apply_params, pseudo_fake_or_real, sample_params


def _mask(box, seed):
    p = sample_params(np.random.default_rng(seed), DEFAULT_CONFIG)
    p = dict(p, blend_ratio=1.0, scale=1.0, tx=0.0, ty=0.0)
    if box is not None:
        p = place_on_face(p, box, DEFAULT_CONFIG)
    image = np.random.default_rng(seed).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    return apply_params(image, p, DEFAULT_CONFIG)[1]


@pytest.mark.parametrize("box", [(0.05, 0.1, 0.45, 0.6), (0.6, 0.5, 0.85, 0.8), (0.12, 0.1, 0.88, 0.92),
                                 (0.2, 0.3, 0.8, 0.95)])
def test_face_aware_mask_covers_the_face_box_and_follows_it(box):
    x0, y0, x1, y1 = (int(v * 128) for v in box)
    for seed in range(8):
        mask = _mask(box, seed)
        inside = mask[y0:y1, x0:x1]
        core = mask[y0 + (y1 - y0) // 4:y1 - (y1 - y0) // 4, x0 + (x1 - x0) // 4:x1 - (x1 - x0) // 4]
        assert core.mean() > 0.6, "the centre half of the face box is blended"
        assert mask[(y0 + y1) // 2, (x0 + x1) // 2] > 0.5
        assert inside.sum() > 0.6 * mask.sum(), "most of the mask lies on the face box"
        ys, xs = np.nonzero(mask > 0.5)
        assert x0 <= xs.mean() <= x1 and y0 <= ys.mean() <= y1  # centred on the face, wherever it is


def test_ellipse_fallback_stays_near_the_centre():
    mask = _mask(None, 0)
    ys, xs = np.nonzero(mask > 0.5)
    assert abs(xs.mean() - 64) < 16 and abs(ys.mean() - 64) < 20
    corner = _mask((0.0, 0.0, 0.3, 0.35), 0)
    ys2, xs2 = np.nonzero(corner > 0.5)
    assert xs2.mean() < 40 and ys2.mean() < 45  # the same draw, moved onto a face in the corner


def test_face_box_from_the_samples_json():
    face = {"box": [110.0, 60.0, 190.0, 160.0], "crop": [80, 40, 200]}
    assert face_box_in_crop(face) == pytest.approx((0.15, 0.1, 0.55, 0.6))
    assert face_box_in_crop({"box": None, "crop": [0, 0, 10]}) is None  # --no-face keep stand-in
    assert face_box_in_crop(None) is None and face_box_in_crop({"box": [1, 1, 0, 0], "crop": [0, 0, 5]}) is None
    assert sample_face_box({"json": json.dumps({"face": face}).encode()}) == pytest.approx((0.15, 0.1, 0.55, 0.6))
    assert sample_face_box({"json": b"{not json"}) is None and sample_face_box({}) is None


def test_pseudo_fake_changes_pixels_only_around_the_face():
    image = np.full((96, 96, 3), 128, np.uint8)
    image += np.random.default_rng(1).integers(0, 40, image.shape, dtype=np.uint8)
    box = (0.55, 0.5, 0.95, 0.95)
    for seed in range(6):
        p = place_on_face(sample_params(np.random.default_rng(seed), DEFAULT_CONFIG), box, DEFAULT_CONFIG)
        out, _, target = apply_params(image, p, DEFAULT_CONFIG, keep_target=True)
        ys, xs = np.nonzero((out != target).any(-1))
        assert xs.size and xs.mean() > 55 and ys.mean() > 50  # the blend lands on the lower-right face
    # the loader's entry point uses the box: same draws, another place
    seeds = [s for s in range(40) if pseudo_fake_or_real(image, np.random.default_rng(s), 1.0)[1]]
    a = pseudo_fake_or_real(image, np.random.default_rng(seeds[0]), 1.0)[0]
    b = pseudo_fake_or_real(image, np.random.default_rng(seeds[0]), 1.0, face_box=box)[0]
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("box", [(0.05, 0.1, 0.45, 0.6), (0.55, 0.45, 0.95, 0.9)])
def test_gpu_batch_path_puts_the_mask_on_the_face_box_like_the_workers(box):
    """The device-batch path (`self_blend_batch`, CUDA modes; its ops run on any device) reads the face box
    from the choice table and places the same mask as the workers' per-image path; rows without a box keep
    the default mask."""
    import torch

    from pipeline.augment.self_blend import params_from_uniforms
    from pipeline.augment.self_blend_batch import BOX, NOISE, UNIFORMS, choice_table, masks_for, params_from_table

    n, size, g = 8, 128, DEFAULT_CONFIG.elastic_grid
    table = choice_table([np.random.default_rng(s) for s in range(n)], 1.0, boxes=[box] * (n - 1) + [None])
    assert np.isfinite(table[:-1, BOX]).all() and np.isnan(table[-1, BOX]).all()
    p = dict(params_from_table(table), blend_ratio=np.ones(n), scale=np.ones(n), tx=np.zeros(n), ty=np.zeros(n))
    masks = masks_for(p, size, size, DEFAULT_CONFIG.mask_stride, torch.device("cpu")).numpy()
    x0, y0, x1, y1 = (int(v * size) for v in box)
    plain = params_from_uniforms(table[:, UNIFORMS], table[:, NOISE].reshape(-1, 2, g, g), DEFAULT_CONFIG)
    image = np.zeros((size, size, 3), np.uint8)
    for i in range(n):
        row = {k: v[i] for k, v in p.items()}
        if i == n - 1:  # no box: the default mask, exactly the parameters without placement
            assert all(np.allclose(row[k], plain[k][i]) for k in ("cx", "cy", "half_w", "half_h"))
            continue
        worker = apply_params(image, place_on_face({k: v[i] for k, v in plain.items()} | dict(
            blend_ratio=1.0, scale=1.0, tx=0.0, ty=0.0), box, DEFAULT_CONFIG), DEFAULT_CONFIG)[1]
        mask = masks[i]
        assert mask[y0:y1, x0:x1].sum() > 0.6 * mask.sum(), "most of the mask lies on the face box"
        ys, xs = np.nonzero(mask > 0.5)
        wy, wx = np.nonzero(worker > 0.5)
        assert x0 <= xs.mean() <= x1 and y0 <= ys.mean() <= y1
        assert abs(xs.mean() - wx.mean()) < 3 and abs(ys.mean() - wy.mean()) < 3, "the workers' mask, same place"
        assert np.abs(mask - worker).mean() < 0.05
