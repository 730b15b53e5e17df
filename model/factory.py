"""One way to build any detector by name: a DeepfakeNet variant (`model.deepfakenet`) or ``timm/NAME``
(`model.timm_backbone`). What `model.create_model` and `model.validate_kwargs` are."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

from torch import nn

from model import deepfakenet, timm_backbone


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build ``name``: a DeepfakeNet variant (``kwargs`` override its arguments) or ``timm/NAME``
    (``input_filter`` only; no weights are downloaded). Either returns logits ``[N, 1]``.

    Raises ValueError naming an unknown model (and the known ones), or an argument out of bounds.
    """
    if timm_backbone.is_timm(name):
        return timm_backbone.TimmDetector(name, **timm_backbone.validate_kwargs(name, kwargs))
    if name not in deepfakenet.default_cfgs:
        raise ValueError(unknown(name))
    return deepfakenet.create_model(name, **kwargs)


def validate_kwargs(name: str, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """The full, checked constructor arguments of ``name`` with ``kwargs`` applied; nothing is built."""
    if timm_backbone.is_timm(name):
        return timm_backbone.validate_kwargs(name, kwargs)
    if name not in deepfakenet.default_cfgs:
        raise ValueError(unknown(name))
    return deepfakenet.validate_kwargs(name, kwargs)


def unknown(name: Any) -> str:
    text = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
    return (f"unknown model {text}: choose one of {', '.join(deepfakenet.list_models())}, or timm/NAME for any "
            "timm architecture")


def head_prefixes(model: nn.Module) -> Tuple[str, ...]:
    """State-dict key prefixes of a detector's classifier head: what a pretrained backbone never brings."""
    own = getattr(model, "head_prefixes", None)
    return own() if callable(own) else ("fc.",)
