"""DeepfakeNet: the original project's ResNeXt-style binary classifier, plus smaller variants.

Architecture (``deepfakenet_base``, as in the original notebook): a 7x7/2 stem convolution to 64
channels, a 3x3/2 max pool (no BN/ReLU between them, as in the original), four stages of
`Bottleneck` blocks with widths 256, 512, 1024, 2048 and 1, 2, 2, 1 blocks (stride 2 from the
second stage), global average pooling and a linear layer to one logit. Every convolution keeps
its bias, as in the original: the base model has exactly 8,788,481 parameters.

``input_filter="npr"`` puts `NPRFilter` (Tan et al., CVPR 2024) in front of the stem, inside
``forward``, so training, evaluation, prediction and ONNX export all see it. The ``deepfakenet_npr*``
variants pair it with NPR's shallow layout: a 3x3/2 stem conv + BN + ReLU + 3x3/2 max pool, as in
NPR's ResNet, then only two stages.

The output is a raw logit ``[N, 1]``: apply ``sigmoid`` for P(fake).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from model.bounds import ARCH_KEYS, INPUT_FILTERS, MIN_IMAGE_SIZE, check_arch

# NPR's code scales the residual by 2/3 before the stem conv; kept for fidelity.
NPR_SCALE = 2.0 / 3.0


class NPRFilter(nn.Module):
    """Neighbouring Pixel Relationships: ``(x - up(down(x))) * NPR_SCALE``, no parameters.

    ``down`` and ``up`` are nearest-neighbour resampling by 2, as in NPR's code, so the output is 0 at
    the top-left pixel of every 2x2 cell and holds the other three pixels' differences to it: the
    traces of a generator's up-sampling. An odd height or width first loses its last row or column
    (NPR's demo does the same), so both resamplings are exact; the output is ``2*(H//2) x 2*(W//2)``.
    This crop is plain slicing and traces to ONNX with the sizes as graph values.
    """

    def __init__(self, scale: float = NPR_SCALE) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = x[..., : h - h % 2, : w - w % 2]
        down = F.interpolate(x, scale_factor=0.5, mode="nearest")
        return (x - F.interpolate(down, scale_factor=2.0, mode="nearest")) * self.scale


class Bottleneck(nn.Module):
    """ResNeXt bottleneck: 1x1 reduce to ``out // 2`` -> 3x3 grouped conv -> 1x1 expand, BN after each.

    Args:
        in_channels: input channels.
        out_channels: output channels (the bottleneck width is ``out_channels // 2``).
        stride: stride of the 3x3 conv and of the projection shortcut.
        groups: groups of the 3x3 conv; must divide ``out_channels // 2``.
        project: use a 1x1 conv + BN shortcut (forced when the stride or the width changes).
        bias: keep the convolution biases (the original does, even before BN).
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int = 1, groups: int = 32,
        project: bool = False, bias: bool = True,
    ) -> None:
        super().__init__()
        mid = out_channels // 2
        if mid % groups:
            raise ValueError(f"groups={groups} must divide the bottleneck width {mid} (out_channels={out_channels} // 2)")
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=bias)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=groups, bias=bias)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, bias=bias)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)
        if project or stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def zero_init_last(self) -> None:
        """Zero the last BN's scale so the block starts as its shortcut (Goyal et al. 2017)."""
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + self.shortcut(x))


def make_stages(
    stem_width: int, widths: Sequence[int], depths: Sequence[int], *, groups: int, bias: bool,
) -> nn.Sequential:
    """The original block layout: stage 1 keeps the resolution, each later stage opens with stride 2."""
    stages: List[nn.Module] = []
    in_ch = stem_width
    for i, (width, depth) in enumerate(zip(widths, depths)):
        if depth < 1:
            raise ValueError(f"depths={tuple(depths)}: every stage needs at least one block")
        blocks = [Bottleneck(in_ch, width, stride=1 if i == 0 else 2, groups=groups, project=True, bias=bias)]
        blocks += [Bottleneck(width, width, groups=groups, bias=bias) for _ in range(depth - 1)]
        stages.append(nn.Sequential(*blocks))
        in_ch = width
    return nn.Sequential(*stages)


class DeepfakeNet(nn.Module):
    """Stem + bottleneck stages + average pool + linear head, returning logits ``[N, 1]``.

    Args:
        widths: output channels of each stage (1 to 4 stages; the original has four).
        depths: blocks per stage.
        stem_width: channels of the stem conv.
        stem_kernel: kernel of the stride-2 stem conv (original: 7; NPR's ResNet: 3).
        groups: groups of every 3x3 conv.
        bias: keep conv biases (original: True).
        stem_norm: add BN + ReLU after the stem conv (the original has none; off by default so
            ``deepfakenet_base`` matches it; adds ``2 * stem_width`` parameters).
        zero_init: zero each block's last BN scale at init (`Bottleneck.zero_init_last`).
        drop_rate: dropout before the head.
        input_filter: ``"none"`` or ``"npr"`` (`NPRFilter` on the input, inside ``forward``).

    Arguments are not range-checked here; `create_model` checks them first (`model.bounds`).
    """

    def __init__(
        self, *, widths: Sequence[int] = (256, 512, 1024, 2048), depths: Sequence[int] = (1, 2, 2, 1),
        stem_width: int = 64, stem_kernel: int = 7, groups: int = 32, bias: bool = True, stem_norm: bool = False,
        zero_init: bool = True, drop_rate: float = 0.0, input_filter: str = "none",
    ) -> None:
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError(f"widths={tuple(widths)} and depths={tuple(depths)} must have the same length")
        if input_filter not in INPUT_FILTERS:
            raise ValueError(f"input_filter={input_filter!r}: choose one of {', '.join(INPUT_FILTERS)}")
        self.input_filter = input_filter
        # No parameters either way, so the filter leaves the state_dict keys alone.
        self.prefilter: nn.Module = NPRFilter() if input_filter == "npr" else nn.Identity()
        stem: List[nn.Module] = [
            nn.Conv2d(3, stem_width, stem_kernel, stride=2, padding=stem_kernel // 2, bias=bias)
        ]
        if stem_norm:
            stem += [nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True)]
        stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)
        self.stages = make_stages(stem_width, widths, depths, groups=groups, bias=bias)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.num_features = widths[-1]
        self.fc = nn.Linear(widths[-1], 1)
        self.init_weights(zero_init=zero_init)

    def init_weights(self, *, zero_init: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    m.zero_init_last()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # Eager-mode only: shape checks would become guards under torch.export / ONNX tracing.
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            if x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"DeepfakeNet expects float NCHW RGB input, got shape {tuple(x.shape)}")
            if min(x.shape[-2:]) < MIN_IMAGE_SIZE:
                raise ValueError(f"input {tuple(x.shape[-2:])} is smaller than MIN_IMAGE_SIZE={MIN_IMAGE_SIZE}")
        return self.stages(self.stem(self.prefilter(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.forward_features(x)).flatten(1)
        return self.fc(self.drop(x))


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    cfg = {"input_size": (3, 224, 224), "min_input_size": (3, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE), "num_classes": 1}
    cfg.update(kwargs)
    return cfg


# timm-style table of named variants: ``arch`` are the constructor arguments, the rest describes use.
# ``num_params`` and ``macs`` (one 224 px image, `count_macs`) are checked by tests/test_model.py.
default_cfgs: Dict[str, Dict[str, Any]] = {
    "deepfakenet_base": _cfg(
        arch=dict(widths=(256, 512, 1024, 2048), depths=(1, 2, 2, 1), stem_width=64, groups=32),
        num_params=8_788_481, macs=2_028_718_080, description="the original DeepfakeNet (about 2.0 GMAC at 224 px)",
    ),
    "deepfakenet_small": _cfg(
        arch=dict(widths=(128, 256, 512, 1024), depths=(1, 2, 2, 1), stem_width=32, groups=16),
        num_params=2_331_905, macs=558_359_552, input_size=(3, 128, 128), description="half-width base, for CPU training",
    ),
    "deepfakenet_tiny": _cfg(
        arch=dict(widths=(32, 64, 128, 256), depths=(1, 1, 1, 1), stem_width=16, groups=8),
        num_params=140_225, macs=56_398_080, input_size=(3, 64, 64),
        description="a few hundred thousand parameters, for tests and smoke runs",
    ),
    # NPR's detector is the stem and the first two stages of a ResNet-50 (3 and 4 blocks); these are
    # the same with DeepfakeNet's ResNeXt blocks (equal budget) and NPR's 3x3/2 stem + BN + max pool.
    "deepfakenet_npr": _cfg(
        arch=dict(widths=(256, 512), depths=(3, 4), stem_width=64, stem_kernel=3, groups=32, bias=False,
                  stem_norm=True, input_filter="npr"),
        num_params=1_405_249, macs=1_741_308_416, description="NPR residual input + stem + two stages, after Tan et al. (CVPR 2024)",
    ),
    "deepfakenet_npr_tiny": _cfg(
        arch=dict(widths=(64, 128), depths=(1, 1), stem_width=16, stem_kernel=3, groups=8, bias=False,
                  stem_norm=True, input_filter="npr"),
        num_params=31_569, macs=49_574_016, input_size=(3, 64, 64),
        description="deepfakenet_npr at about 32 thousand parameters, for tests and CPU",
    ),
}

_DEFAULTS: Dict[str, Any] = {
    k: p.default for k, p in inspect.signature(DeepfakeNet.__init__).parameters.items() if k != "self"
}


def validate_kwargs(name: str, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """The full `DeepfakeNet` arguments of variant ``name`` with ``kwargs`` applied, checked first.

    Every value is type- and range-checked (`model.bounds`: widths, depths, stem_width, groups,
    stem_kernel, drop_rate, the booleans, input_filter, and at most MAX_PARAMS parameters) without
    building anything, so untrusted kwargs (checkpoint metadata) cannot allocate much or crash torch.
    Raises ValueError naming the model and the offending argument.
    """
    if name not in default_cfgs:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(list_models())}")
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{name}: model kwargs must be a mapping, got {type(kwargs).__name__}")
    arch = {**_DEFAULTS, **default_cfgs[name]["arch"], **kwargs}
    try:
        check_arch(arch)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return arch


def _builder(name: str) -> Callable[..., DeepfakeNet]:
    def build(**kwargs: Any) -> DeepfakeNet:
        return DeepfakeNet(**validate_kwargs(name, kwargs))

    build.__name__ = name
    build.__doc__ = f"{name}: {default_cfgs[name]['description']}. Keyword arguments override `DeepfakeNet`'s."
    return build


deepfakenet_base = _builder("deepfakenet_base")
deepfakenet_small = _builder("deepfakenet_small")
deepfakenet_tiny = _builder("deepfakenet_tiny")
deepfakenet_npr = _builder("deepfakenet_npr")
deepfakenet_npr_tiny = _builder("deepfakenet_npr_tiny")

_REGISTRY: Dict[str, Callable[..., DeepfakeNet]] = {
    "deepfakenet_base": deepfakenet_base,
    "deepfakenet_small": deepfakenet_small,
    "deepfakenet_tiny": deepfakenet_tiny,
    "deepfakenet_npr": deepfakenet_npr,
    "deepfakenet_npr_tiny": deepfakenet_npr_tiny,
}
assert set(_REGISTRY) == set(default_cfgs) and set(_DEFAULTS) == set(ARCH_KEYS)


def list_models() -> List[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the named variant; ``kwargs`` override its `DeepfakeNet` arguments (`validate_kwargs` first).

    Raises ValueError naming the unknown model and the known ones, or the argument out of bounds.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_size: int = 224) -> int:
    """Multiply-accumulates of convolutions and linear layers for one ``3 x S x S`` image.

    Counted from the output shapes of one forward pass in eval mode (the mode is restored) on the
    model's device: a model built under ``torch.device("meta")`` is counted without any compute.
    Biases, BN, pooling, activations and `NPRFilter` are not counted (a few MAC per pixel at most).
    """
    total = 0

    def hook(m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def input_size(name: str) -> Tuple[int, int, int]:
    """The default ``(C, H, W)`` input of a named variant."""
    if name not in default_cfgs:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(list_models())}")
    return default_cfgs[name]["input_size"]
