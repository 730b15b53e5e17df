"""Bounds on `DeepfakeNet` arguments, checked before anything is built.

Checkpoint metadata is untrusted input: a ``model_kwargs`` of ``{"widths": [65536, ...]}`` must be
a one-line error, not a multi-GB allocation or a torch traceback. `check_arch` checks every
constructor argument's type and range, the layout rules (``groups`` divides each bottleneck width,
widths and depths have the same length) and the total parameter count (`estimate_params`, exact,
computed without building). Imports nothing from pipeline/ or shard_tools/, nor torch.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Sequence, Tuple

# Smallest input side every variant accepts: a four-stage network downsamples by 32 (stem 2,
# pool 2, three stride-2 stages); below that the last stage would see an empty feature map.
MIN_IMAGE_SIZE = 32
# Largest input side a checkpoint may ask for (16x the 256 px of the original data).
MAX_IMAGE_SIZE = 4096
# Largest model `check_arch` lets through: about 11x deepfakenet_base, 400 MB of float32 weights.
MAX_PARAMS = 100_000_000
# At most four stages, so that MIN_IMAGE_SIZE (the total downsampling of 32) holds for every model.
MAX_STAGES = 4
INPUT_FILTERS = ("none", "npr")

# Every `DeepfakeNet` keyword and its rule; an int rule is an inclusive range.
INT_BOUNDS: Dict[str, Tuple[int, int]] = {"stem_width": (1, 1024), "groups": (1, 512), "stem_kernel": (1, 7)}
SEQ_BOUNDS: Dict[str, Tuple[int, int]] = {"widths": (2, 4096), "depths": (1, 16)}
BOOL_KEYS = ("bias", "stem_norm", "zero_init")
ARCH_KEYS = (*SEQ_BOUNDS, *INT_BOUNDS, *BOOL_KEYS, "drop_rate", "input_filter")


def _show(value: Any, limit: int = 60) -> str:
    # A short repr: the value may be a hostile million-item list from a checkpoint's metadata.
    if isinstance(value, (list, tuple)) and len(value) > 8:
        text = repr(type(value)(value[:8]))
        text = f"{text[:-1]}, ...{text[-1]}"
        return text if len(text) <= limit else text[: limit - 3] + "..."
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_types(arch: Mapping[str, Any]) -> None:
    for key, (lo, hi) in SEQ_BOUNDS.items():
        value = arch[key]
        if not (isinstance(value, (list, tuple)) and 1 <= len(value) <= MAX_STAGES
                and all(_is_int(v) and lo <= v <= hi for v in value)):
            raise ValueError(f"{key}={_show(value)}: must be a list of 1 to {MAX_STAGES} ints, each in [{lo}, {hi}]")
    for key, (lo, hi) in INT_BOUNDS.items():
        if not (_is_int(arch[key]) and lo <= arch[key] <= hi):
            raise ValueError(f"{key}={_show(arch[key])}: must be an int in [{lo}, {hi}]")
    for key in BOOL_KEYS:
        if not isinstance(arch[key], bool):
            raise ValueError(f"{key}={_show(arch[key])}: must be true or false")
    rate = arch["drop_rate"]
    if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and math.isfinite(rate) and 0 <= rate < 1):
        raise ValueError(f"drop_rate={_show(rate)}: must be a number in [0, 1)")
    if arch["input_filter"] not in INPUT_FILTERS:
        raise ValueError(f"input_filter={_show(arch['input_filter'])}: choose one of {', '.join(INPUT_FILTERS)}")


def _check_layout(arch: Mapping[str, Any]) -> None:
    widths, depths, groups = arch["widths"], arch["depths"], arch["groups"]
    if len(widths) != len(depths):
        raise ValueError(f"widths={_show(widths)} and depths={_show(depths)} must have the same length")
    for width in widths:
        if (width // 2) % groups:
            raise ValueError(f"groups={groups} must divide the bottleneck width {width // 2} (out_channels={width} // 2)")
    if arch["stem_kernel"] % 2 == 0:
        raise ValueError(f"stem_kernel={arch['stem_kernel']}: must be odd (the stem pads kernel // 2 on each side)")
    if arch["input_filter"] == "npr" and arch["stem_kernel"] == 1:
        # A 1x1 stride-2 conv samples only the top-left pixel of each 2x2 cell, where the NPR residual is 0.
        raise ValueError("stem_kernel=1 with input_filter='npr': the stem would see only the zeros of the NPR residual")


def check_arch(arch: Mapping[str, Any]) -> None:
    """Raise ValueError (``"key=value: what is accepted"``) unless ``arch`` is a buildable, bounded model.

    ``arch`` holds every `DeepfakeNet` keyword (`ARCH_KEYS`): a variant's defaults plus overrides.
    """
    unknown = sorted(set(arch) - set(ARCH_KEYS))
    if unknown:
        raise ValueError(f"unknown argument {_show(unknown[0])}: accepted are {', '.join(ARCH_KEYS)}")
    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise ValueError(f"missing arguments {', '.join(missing)}")
    _check_types(arch)
    _check_layout(arch)
    n = estimate_params(arch)
    if n > MAX_PARAMS:
        raise ValueError(f"widths={_show(arch['widths'])}, depths={_show(arch['depths'])}: {n:,} parameters, "
                         f"more than MAX_PARAMS={MAX_PARAMS:,}")


def _bottleneck_params(in_ch: int, out_ch: int, *, groups: int, bias: bool, project: bool) -> int:
    mid = out_ch // 2
    n = in_ch * mid + mid * (mid // groups) * 9 + mid * out_ch + 2 * (2 * mid + out_ch)  # convs + BN
    n += (2 * mid + out_ch) if bias else 0
    if project:
        n += in_ch * out_ch + 2 * out_ch + (out_ch if bias else 0)
    return n


def estimate_params(arch: Mapping[str, Any]) -> int:
    """The exact parameter count of ``DeepfakeNet(**arch)``, computed without building it."""
    sw, k, bias = arch["stem_width"], arch["stem_kernel"], arch["bias"]
    n = 3 * sw * k * k + (sw if bias else 0) + (2 * sw if arch["stem_norm"] else 0)
    in_ch = sw
    widths: Sequence[int] = arch["widths"]
    for width, depth in zip(widths, arch["depths"]):
        n += _bottleneck_params(in_ch, width, groups=arch["groups"], bias=bias, project=True)
        n += (depth - 1) * _bottleneck_params(width, width, groups=arch["groups"], bias=bias, project=False)
        in_ch = width
    return n + widths[-1] + 1  # the linear head
