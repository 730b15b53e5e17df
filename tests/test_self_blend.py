"""Self-Blended Images (pipeline.augment.self_blend) on tiny real arrays (64x64), through its public functions."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import make_face

from pipeline.augment.self_blend import (
    SelfBlendConfig,
    apply_params,
    contact_sheet,
    sample_params,
    self_blend,
    self_blend_pair,
)

SIZE = 64
CFG = SelfBlendConfig()


def faces(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([make_face(rng, SIZE) for _ in range(n)])


def params(seed: int, **fixed) -> dict:
    p = sample_params(np.random.default_rng(seed), CFG)
    p.update({k: np.asarray(v) for k, v in fixed.items()})
    return p


@pytest.mark.parametrize("seed", range(12))
def test_outside_the_mask_the_output_is_the_target(seed: int) -> None:
    image = faces(1, seed)[0]
    # Source transformed: the target is the untouched image, so outside the mask nothing changes.
    out, mask, _ = apply_params(image, params(seed, transform_source=True), CFG)
    outside = mask == 0
    assert outside.mean() > 0.2 and np.array_equal(out[outside], image[outside])
    assert not np.array_equal(out, image)
    # Target transformed: outside the mask the output is the transformed target, not the image.
    out, mask, target = apply_params(image, params(seed, transform_source=False), CFG, keep_target=True)
    outside = mask == 0
    assert np.array_equal(out[outside], target[outside]) and not np.array_equal(target, image)


def test_pair_returns_the_target_and_leaves_the_input_alone() -> None:
    image = faces(1, 3)[0]
    before = image.copy()
    target, blended, mask = self_blend_pair(image, np.random.default_rng(1))
    assert np.array_equal(image, before)
    assert np.array_equal(blended[mask == 0], target[mask == 0])


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 1.0])
def test_blend_ratio_scales_the_mask_and_the_mix(ratio: float) -> None:
    # A flat image: the transformed source is flat too, so every output pixel must be the mix
    # m * source + (1 - m) * target of two known colours (8-bit alpha: within 1.5 levels).
    image = np.full((SIZE, SIZE, 3), 120, np.uint8)
    p = params(5, transform_source=True, blend_ratio=ratio, rgb_shift=[30.0, -20.0, 10.0], brightness=10.0)
    out, mask, _ = apply_params(image, p, CFG)
    source = apply_params(image, dict(p, blend_ratio=np.asarray(1.0), half_w=np.asarray(0.5),
                                      cx=np.asarray(0.5), cy=np.asarray(0.5), half_h=np.asarray(0.5)), CFG)[0]
    colour = source[SIZE // 2, SIZE // 2].astype(np.float32)
    assert np.abs(colour - 120).max() > 5
    assert mask.max() == pytest.approx(ratio, abs=0.02)
    expected = mask[..., None] * colour + (1 - mask[..., None]) * 120.0
    assert np.abs(out.astype(np.float32) - expected).max() <= 1.5


def test_blend_ratios_are_drawn_from_the_config() -> None:
    cfg = SelfBlendConfig(blend_ratios=(0.5,))
    peaks = [self_blend(faces(1, i)[0], np.random.default_rng(i), cfg)[1].max() for i in range(5)]
    assert np.allclose(peaks, 0.5, atol=0.02)
    drawn = {float(sample_params(np.random.default_rng(i), CFG)["blend_ratio"]) for i in range(200)}
    assert drawn == {0.25, 0.5, 0.75, 1.0}


def test_masks_are_bounded_smooth_non_empty_and_not_everything() -> None:
    image = faces(1)[0]
    rng = np.random.default_rng(0)
    for _ in range(40):
        _, mask = self_blend(image, rng)
        assert mask.dtype == np.float32 and mask.shape == (SIZE, SIZE)
        assert mask.min() >= 0.0 and mask.max() <= 1.0
        assert 0.02 < (mask > 0).mean() < 0.8 and mask.max() >= 0.249
        assert mask[0, 0] == mask[0, -1] == mask[-1, 0] == mask[-1, -1] == 0
        steps = max(np.abs(np.diff(mask, axis=0)).max(), np.abs(np.diff(mask, axis=1)).max())
        assert steps < 0.3  # a soft edge: no jump of a third of the range between neighbours


def test_same_seed_same_output_other_seed_other_output() -> None:
    image = faces(1)[0]
    a = self_blend(image, np.random.default_rng([7, 0, 3]))
    b = self_blend(image, np.random.default_rng([7, 0, 3]))
    c = self_blend(image, np.random.default_rng([7, 0, 4]))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_bad_image_is_refused() -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        self_blend(np.zeros((8, 8), np.uint8), np.random.default_rng(0))


@pytest.mark.parametrize("field, value", [("source_prob", 1.5), ("rgb_shift", -1.0), ("scale", (1.1, 0.9)),
                                          ("mask_half_width", (0.0, 0.2)), ("blend_ratios", (0.0, 1.0)),
                                          ("downscale_factors", (2.5,)), ("mask_stride", 0), ("blur_sigma", (0.1,))])
def test_config_errors_name_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"SelfBlendConfig.{field}="):
        SelfBlendConfig(**{field: value})


def test_contact_sheet_shape() -> None:
    images = faces(3)
    results = [self_blend(img, np.random.default_rng(i)) for i, img in enumerate(images)]
    sheet = contact_sheet(images, [r[0] for r in results], [r[1] for r in results])
    assert sheet.shape == (3 * SIZE, 4 * SIZE, 3) and sheet.dtype == np.uint8
    assert np.array_equal(sheet[:SIZE, :SIZE], images[0]) and np.array_equal(sheet[:SIZE, SIZE:2 * SIZE], results[0][0])
