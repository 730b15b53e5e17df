"""DeepfakeNet: the original architecture's size, the variants, forward/backward on CPU."""
from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from model import (
    MIN_IMAGE_SIZE,
    Bottleneck,
    DeepfakeNet,
    NPRFilter,
    count_macs,
    count_params,
    create_model,
    default_cfgs,
    list_models,
    validate_kwargs,
)
from model.bounds import ARCH_KEYS, estimate_params

VARIANTS = ["deepfakenet_base", "deepfakenet_npr", "deepfakenet_npr_tiny", "deepfakenet_small", "deepfakenet_tiny"]


def on_meta(name: str, **kwargs) -> nn.Module:
    """The variant without allocating or computing anything (shapes only)."""
    with torch.device("meta"):
        return create_model(name, **kwargs)


def test_registry_lists_the_variants():
    assert list_models() == VARIANTS
    assert set(default_cfgs) == set(list_models())
    assert MIN_IMAGE_SIZE == 32


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_params_and_macs_match_the_table(name):
    m = on_meta(name)
    assert count_params(m) == default_cfgs[name]["num_params"]
    assert count_macs(m, 224) == default_cfgs[name]["macs"]


@pytest.mark.parametrize("name, digest", [
    ("deepfakenet_base", "2550eadac8d3e2d3"), ("deepfakenet_small", "d8e831ed4918cfb8"),
    ("deepfakenet_tiny", "f7c9e30a21e936c0"),
])
def test_existing_variants_keep_their_state_dict(name, digest):
    # Digests of "key:shape" lines taken before input_filter/stem_kernel were added: old checkpoints load.
    for m in (on_meta(name), on_meta(name, input_filter="npr")):  # the filter has no parameters
        text = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in m.state_dict().items())
        assert hashlib.sha256(text.encode()).hexdigest()[:16] == digest


def test_base_matches_the_original_parameter_count():
    # The original notebook's DeepfakeNet (conv biases kept, no BN after the stem): 8,788,481, ~2.0 GMAC.
    m = on_meta("deepfakenet_base")
    assert count_params(m) == 8_788_481 == default_cfgs["deepfakenet_base"]["num_params"]
    assert 1.95e9 < count_macs(m, 224) < 2.05e9


def test_base_layout_follows_the_original():
    m = create_model("deepfakenet_base")
    assert [len(s) for s in m.stages] == [1, 2, 2, 1]
    assert [s[0].conv3.out_channels for s in m.stages] == [256, 512, 1024, 2048]
    assert [s[0].conv2.stride for s in m.stages] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert all(b.conv2.groups == 32 for s in m.stages for b in s)
    # Projection shortcut on the first block of each stage, identity on the others.
    assert all(isinstance(s[0].shortcut, nn.Sequential) for s in m.stages)
    assert isinstance(m.stages[1][1].shortcut, nn.Identity)
    assert [type(x) for x in m.stem] == [nn.Conv2d, nn.MaxPool2d]
    assert m.fc.in_features == 2048 and m.fc.out_features == 1


def test_stem_norm_and_bias_options_change_the_count_as_documented():
    base = count_params(create_model("deepfakenet_base"))
    assert count_params(create_model("deepfakenet_base", stem_norm=True)) == base + 2 * 64
    no_bias = create_model("deepfakenet_base", bias=False)
    n_conv_bias = sum(mod.out_channels for mod in create_model("deepfakenet_base").modules() if isinstance(mod, nn.Conv2d))
    assert count_params(no_bias) == base - n_conv_bias


def test_variants_are_smaller():
    sizes = [count_params(create_model(n)) for n in ("deepfakenet_tiny", "deepfakenet_small", "deepfakenet_base")]
    assert sizes == sorted(sizes) and sizes[0] < 500_000


@pytest.mark.parametrize("size", [MIN_IMAGE_SIZE, 48, 64])
def test_tiny_forward_backward(size):
    torch.manual_seed(0)
    m = create_model("deepfakenet_tiny")
    x = torch.randn(4, 3, size, size)
    y = torch.tensor([0.0, 1.0, 0.0, 1.0])
    out = m(x)
    assert out.shape == (4, 1) and out.dtype == torch.float32
    loss = nn.functional.binary_cross_entropy_with_logits(out.squeeze(1), y)
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_tiny_learns_a_trivial_task():
    torch.manual_seed(0)
    m = create_model("deepfakenet_tiny")
    x = torch.randn(16, 3, 32, 32)
    y = (torch.arange(16) % 2).float()
    x[y == 1] += 1.0
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = nn.functional.binary_cross_entropy_with_logits(m(x).squeeze(1), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_zero_init_last_makes_blocks_start_as_shortcut():
    m = create_model("deepfakenet_tiny")
    blocks = [b for b in m.modules() if isinstance(b, Bottleneck)]
    assert blocks and all(torch.all(b.bn3.weight == 0) for b in blocks)
    m2 = create_model("deepfakenet_tiny", zero_init=False)
    assert all(torch.all(b.bn3.weight == 1) for b in m2.modules() if isinstance(b, Bottleneck))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*deepfakenet_base"):
        create_model("resnet50")
    with pytest.raises(ValueError, match="groups=5 must divide"):
        create_model("deepfakenet_tiny", groups=5)
    with pytest.raises(ValueError, match="MIN_IMAGE_SIZE"):
        create_model("deepfakenet_tiny")(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="NCHW"):
        create_model("deepfakenet_tiny")(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="unknown argument 'width'"):
        create_model("deepfakenet_tiny", width=3)


def test_eval_mode_is_deterministic_and_batch_independent():
    m = create_model("deepfakenet_tiny").eval()
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        full = m(x)
        single = torch.cat([m(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(full, single, rtol=1e-4, atol=1e-5)
    assert isinstance(m, DeepfakeNet)


def test_count_macs_restores_training_mode():
    m = create_model("deepfakenet_npr_tiny").train()
    assert count_macs(m, 32) > 0 and m.training


# --- NPR input filter (Tan et al., CVPR 2024) ---------------------------------------------------

def npr_reference(x: torch.Tensor) -> torch.Tensor:
    """NPR's own expression (networks/resnet.py), for even sizes."""
    f = nn.functional.interpolate
    half = f(x, scale_factor=0.5, mode="nearest", recompute_scale_factor=True)
    return (x - f(half, scale_factor=2.0, mode="nearest", recompute_scale_factor=True)) * 2.0 / 3.0


def test_npr_filter_on_a_known_input():
    x = torch.arange(16.0).view(1, 1, 4, 4)  # x[i, j] = 4i + j
    # Each pixel minus the top-left pixel of its 2x2 cell, times 2/3.
    want = torch.tensor([[0.0, 1, 0, 1], [4, 5, 4, 5], [0, 1, 0, 1], [4, 5, 4, 5]]).view(1, 1, 4, 4) * 2 / 3
    torch.testing.assert_close(NPRFilter()(x), want)
    # An image that is itself a nearest 2x up-sampling has no residual at all.
    up = nn.functional.interpolate(torch.randn(2, 3, 8, 8), scale_factor=2, mode="nearest")
    assert torch.equal(NPRFilter()(up), torch.zeros_like(up))
    y = torch.randn(2, 3, 16, 12)
    torch.testing.assert_close(NPRFilter()(y), npr_reference(y))
    assert torch.all(NPRFilter()(y)[..., ::2, ::2] == 0)


@pytest.mark.parametrize("h, w", [(5, 7), (33, 32), (32, 35)])
def test_npr_filter_crops_odd_sizes_to_even(h, w):
    x = torch.randn(1, 3, h, w)
    out = NPRFilter()(x)
    assert out.shape[-2:] == (h - h % 2, w - w % 2)
    torch.testing.assert_close(out, npr_reference(x[..., : h - h % 2, : w - w % 2]))


def test_npr_variant_layout_follows_npr():
    m = on_meta("deepfakenet_npr")
    assert isinstance(m.prefilter, NPRFilter) and m.input_filter == "npr"
    conv = m.stem[0]
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((3, 3), (2, 2), (1, 1), None)
    assert [type(x) for x in m.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    assert [len(s) for s in m.stages] == [3, 4] and m.fc.in_features == 512
    assert 1.3e6 < count_params(m) < 1.5e6  # NPR's ResNet-50 stem + layer1 + layer2: about 1.4 M
    assert isinstance(on_meta("deepfakenet_base").prefilter, nn.Identity)


@pytest.mark.parametrize("size", [(MIN_IMAGE_SIZE, MIN_IMAGE_SIZE), (33, 35), (64, 47)])
def test_npr_tiny_forward_backward(size):
    torch.manual_seed(0)
    m = create_model("deepfakenet_npr_tiny")
    x = torch.randn(4, 3, *size)
    out = m(x)
    assert out.shape == (4, 1) and torch.isfinite(out).all()
    nn.functional.binary_cross_entropy_with_logits(out.squeeze(1), torch.tensor([0.0, 1, 0, 1])).backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    m.eval()
    with torch.no_grad():  # an odd last row/column is dropped, not padded
        h, w = size
        torch.testing.assert_close(m(x), m(x[..., : h - h % 2, : w - w % 2]))


# --- bounds on the keyword arguments (untrusted checkpoint metadata goes through them) -----------

@pytest.mark.parametrize("kwargs, match", [
    ({"widths": (65536, 64, 128, 256)}, r"widths=\(65536, .*each in \[2, 4096\]"),
    ({"widths": [32, "64", 128, 256]}, "widths="),
    ({"widths": (32,) * 5, "depths": (1,) * 5}, "1 to 4 ints"),
    ({"depths": (1, 0, 1, 1)}, r"depths=\(1, 0, 1, 1\)"),
    ({"depths": (1, 1)}, "must have the same length"),
    ({"stem_width": -1}, r"stem_width=-1: must be an int in \[1, 1024\]"),
    ({"stem_width": True}, "stem_width=True"),
    ({"stem_width": 16.0}, "stem_width=16.0"),
    ({"groups": 0}, "groups=0"),
    ({"stem_kernel": 4}, "stem_kernel=4: must be odd"),
    ({"stem_kernel": 9}, "stem_kernel=9"),
    ({"stem_norm": 1}, "stem_norm=1: must be true or false"),
    ({"drop_rate": float("nan")}, "drop_rate=nan"),
    ({"drop_rate": 1.0}, "drop_rate=1.0"),
    ({"input_filter": "srm"}, "input_filter='srm': choose one of none, npr"),
    ({"input_filter": "npr", "stem_kernel": 1}, "only the zeros of the NPR residual"),
    ({"widths": (4096,) * 4, "depths": (16,) * 4, "groups": 1}, "parameters, more than MAX_PARAMS=100,000,000"),
    ({"zero_init": None, "foo": 1}, "unknown argument 'foo'"),
])
def test_validate_kwargs_rejects_out_of_bounds_values(kwargs, match):
    with pytest.raises(ValueError, match="deepfakenet_tiny: .*" + match):
        validate_kwargs("deepfakenet_tiny", kwargs)
    with pytest.raises(ValueError, match=match):  # create_model checks before it builds anything
        create_model("deepfakenet_tiny", **kwargs)


def test_validate_kwargs_returns_the_full_arguments():
    arch = validate_kwargs("deepfakenet_npr_tiny", {"drop_rate": 0.1})
    assert set(arch) == set(ARCH_KEYS)
    assert arch["input_filter"] == "npr" and arch["stem_kernel"] == 3 and arch["drop_rate"] == 0.1
    assert validate_kwargs("deepfakenet_base", {})["input_filter"] == "none"
    with pytest.raises(ValueError, match="unknown model 'x'"):
        validate_kwargs("x", {})
    with pytest.raises(ValueError, match="must be a mapping, got list"):
        validate_kwargs("deepfakenet_tiny", [1])  # type: ignore[arg-type]


@pytest.mark.parametrize("name, kwargs", [
    *[(n, {}) for n in VARIANTS],
    ("deepfakenet_tiny", {"bias": False, "stem_norm": True, "stem_kernel": 5}),
    ("deepfakenet_small", {"widths": (64, 96), "depths": (2, 3), "groups": 4, "stem_width": 8}),
])
def test_estimate_params_is_exact(name, kwargs):
    assert estimate_params(validate_kwargs(name, kwargs)) == count_params(on_meta(name, **kwargs))
