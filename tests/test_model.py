"""DeepfakeNet: the original architecture's size, the variants, forward/backward on CPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model import MIN_IMAGE_SIZE, Bottleneck, DeepfakeNet, count_params, create_model, default_cfgs, list_models


def test_registry_lists_the_three_variants():
    assert list_models() == ["deepfakenet_base", "deepfakenet_small", "deepfakenet_tiny"]
    assert set(default_cfgs) == set(list_models())
    assert MIN_IMAGE_SIZE == 32


def test_base_matches_the_original_parameter_count():
    # The original notebook's DeepfakeNet (conv biases kept, no BN after the stem): 8,788,481.
    assert count_params(create_model("deepfakenet_base")) == 8_788_481 == default_cfgs["deepfakenet_base"]["num_params"]


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


def test_eval_mode_is_deterministic_and_batch_independent():
    m = create_model("deepfakenet_tiny").eval()
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        full = m(x)
        single = torch.cat([m(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(full, single, rtol=1e-4, atol=1e-5)
    assert isinstance(m, DeepfakeNet)
