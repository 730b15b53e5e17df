"""Any timm architecture as a detector: ``create_model("timm/NAME")`` -> `TimmDetector` (one logit).

``NAME`` is a timm model name, optionally with its pretrained tag (``resnet18.a1_in1k``); timm builds it
with ``num_classes=1`` and no weights (pretrained weights come from `model.pretrained`, only when
training asks). The detector returns logits ``[N, 1]`` like `model.DeepfakeNet`, and takes the same
``input_filter`` (`NPRFilter` in front of the backbone, inside ``forward``). State-dict keys are the
timm model's under ``backbone.``.

timm is imported only when a ``timm/`` name is used: the rest of the package works without it, and a
missing timm is one line saying how to install it.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Dict, Mapping, Tuple

import torch
from torch import nn

from model.bounds import INPUT_FILTERS
from model.deepfakenet import NPRFilter

PREFIX = "timm/"
# Keyword arguments a timm detector takes (and a checkpoint's model_kwargs may hold).
KWARGS = ("input_filter",)


def is_timm(name: Any) -> bool:
    """True for a ``timm/NAME`` model name."""
    return isinstance(name, str) and name.startswith(PREFIX)


def arch(name: str) -> str:
    """The timm model name of ``timm/NAME``."""
    return name[len(PREFIX):]


def _timm():
    if importlib.util.find_spec("timm") is None:
        raise ValueError("timm is not installed: pip install timm (a dependency of deepfake-pipeline: "
                         "pip install -e . installs it)")
    import timm

    return timm


def pretrained_cfg(name: str) -> Dict[str, Any]:
    """timm's pretrained config of ``timm/NAME`` (mean, std, input size, classifier); ValueError naming
    the model when timm does not know the architecture or the tag."""
    timm = _timm()
    model_name = arch(name)
    if not model_name or not timm.is_model(model_name):
        raise ValueError(f"unknown model {name!r}: timm has no architecture {model_name!r} (see "
                         "timm.list_models(); e.g. timm/resnet18, timm/tf_efficientnet_lite0)")
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model_name)
    except RuntimeError as e:  # an unknown pretrained tag
        raise ValueError(f"unknown model {name!r}: {e}") from None
    return cfg.to_dict() if cfg is not None else {}


def norm_of(name: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The input normalisation ``(mean, std)`` timm's pretrained config gives ``timm/NAME``."""
    cfg = pretrained_cfg(name)
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def validate_kwargs(name: str, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """The arguments of `TimmDetector` for ``timm/NAME``, checked; ValueError naming the model and argument."""
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{name}: model kwargs must be a mapping, got {type(kwargs).__name__}")
    pretrained_cfg(name)
    unknown = sorted(set(kwargs) - set(KWARGS))
    if unknown:
        raise ValueError(f"{name}: unknown argument {unknown[0]!r}: a timm model takes {', '.join(KWARGS)}")
    out = {"input_filter": kwargs.get("input_filter", "none")}
    if out["input_filter"] not in INPUT_FILTERS:
        raise ValueError(f"{name}: input_filter={out['input_filter']!r}: choose one of {', '.join(INPUT_FILTERS)}")
    return out


class TimmDetector(nn.Module):
    """A timm backbone with a one-logit head, returning logits ``[N, 1]``.

    Args:
        name: ``timm/NAME``.
        input_filter: ``"none"`` or ``"npr"`` (`NPRFilter` on the input, inside ``forward``).
    """

    def __init__(self, name: str, *, input_filter: str = "none") -> None:
        super().__init__()
        kwargs = validate_kwargs(name, {"input_filter": input_filter})
        self.model_name, self.input_filter = name, kwargs["input_filter"]
        self.prefilter: nn.Module = NPRFilter() if self.input_filter == "npr" else nn.Identity()
        self.backbone = _timm().create_model(arch(name), pretrained=False, num_classes=1)
        self.init_head()

    def init_head(self) -> None:
        """Small random weights and zero bias for the one-logit head, so training starts at P(fake) ~ 0.5.
        (Some timm inits scale by 1/sqrt(fan_out): with one output, EfficientNet's head would start at
        weights in [-1, 1] and logits of several units.)"""
        head = self.backbone.get_classifier()
        for module in head.modules() if isinstance(head, nn.Module) else []:
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def head_prefixes(self) -> Tuple[str, ...]:
        """State-dict key prefixes of the classifier head (new, one logit: never loaded from ImageNet weights)."""
        classifier = self.backbone.pretrained_cfg.get("classifier") or "fc"
        names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        return tuple(f"backbone.{n}." for n in names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.prefilter(x))
