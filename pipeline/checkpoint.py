"""Model checkpoints: safetensors weights + string metadata, so evaluate/predict/export need no flags.

A checkpoint is one ``.safetensors`` file holding the unwrapped model's ``state_dict()`` and the
metadata (every value a string, as safetensors requires)::

    format="deepfake-detector/1", model="deepfakenet_tiny", image_size="64",
    mean="[0.485, 0.456, 0.406]", std="[...]", epoch="3", metrics="{...}", model_kwargs="{}"

No pickle anywhere. A run directory resolves to ``RUN_DIR/best.safetensors``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from pipeline.augment.config import MEAN, STD
from shard_tools.fsutil import atomic_write_bytes

FORMAT = "deepfake-detector/1"
BEST = "best.safetensors"
LAST = "last.safetensors"
_JSON_KEYS = ("mean", "std", "metrics", "model_kwargs")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the problem."""


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP/accelerate (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _clean(obj: Any) -> Any:
    # Strict JSON: NaN/inf become null.
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def save_checkpoint(
    path: Union[str, Path], model: nn.Module, *, model_name: str, image_size: int,
    extra: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write the unwrapped ``model``'s weights and metadata to ``path`` atomically.

    ``extra`` adds metadata: ``epoch`` (int), ``metrics`` (dict), ``model_kwargs`` (dict passed to
    `model.create_model`, so a variant built with overrides loads back) and any other key; values
    that are not strings are stored as JSON.
    """
    from safetensors.torch import save

    extra = dict(extra or {})
    meta: Dict[str, str] = {
        "format": FORMAT, "model": str(model_name), "image_size": str(int(image_size)),
        "mean": json.dumps(list(MEAN)), "std": json.dumps(list(STD)),
        "epoch": json.dumps(extra.pop("epoch", None)),
        "metrics": json.dumps(_clean(extra.pop("metrics", {})), default=_json_default),
        "model_kwargs": json.dumps(_clean(extra.pop("model_kwargs", {})), default=_json_default),
    }
    for key, value in extra.items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(_clean(value), default=_json_default)
    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    path = Path(path)
    atomic_write_bytes(path, save(state, metadata=meta))
    return path


def resolve_checkpoint(path_or_run_dir: Union[str, Path]) -> Path:
    """A ``.safetensors`` path, or ``RUN_DIR/best.safetensors`` for a run directory."""
    path = Path(path_or_run_dir)
    if path.is_dir():
        best = path / BEST
        if not best.exists():
            have = ", ".join(sorted(p.name for p in path.glob("*.safetensors"))) or "none"
            raise CheckpointError(f"{path}: run directory has no {BEST} (safetensors files there: {have})")
        return best
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or run directory")
    return path


def read_metadata(path_or_run_dir: Union[str, Path]) -> Dict[str, Any]:
    """The decoded metadata of a checkpoint (``image_size``/``epoch`` ints, JSON fields parsed), plus ``path``."""
    from safetensors import safe_open

    path = resolve_checkpoint(path_or_run_dir)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"{path}: not a safetensors file ({type(e).__name__}: {e})") from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: metadata format is {raw.get('format')!r}, expected {FORMAT!r} (not written by deepfake-train?)"
        )
    meta: Dict[str, Any] = dict(raw)
    try:
        meta["image_size"] = int(raw["image_size"])
        meta["epoch"] = json.loads(raw.get("epoch", "null"))
        for key in _JSON_KEYS:
            if key in raw:
                meta[key] = json.loads(raw[key])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: bad checkpoint metadata ({type(e).__name__}: {e})") from None
    if "model" not in meta:
        raise CheckpointError(f"{path}: checkpoint metadata has no 'model' name")
    meta.setdefault("model_kwargs", {})
    meta["path"] = str(path)
    return meta


def load_checkpoint(path_or_run_dir: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the model named in the metadata, load the weights strictly, return ``(model.eval(), meta)``.

    Raises `CheckpointError` naming the file for: a missing file, a file that is not safetensors, a
    foreign format, an unknown model, missing/unexpected keys, or a shape mismatch.
    """
    from safetensors.torch import load_file

    from model import create_model, list_models

    meta = read_metadata(path_or_run_dir)
    path = Path(meta["path"])
    if meta["model"] not in list_models():
        raise CheckpointError(f"{path}: unknown model {meta['model']!r} (known: {', '.join(list_models())})")
    try:
        model = create_model(meta["model"], **meta["model_kwargs"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot build {meta['model']} with model_kwargs {meta['model_kwargs']}: {e}") from None
    state = load_file(str(path), device="cpu")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match {meta['model']}: missing keys {_short(missing)}, unexpected keys {_short(unexpected)}"
        )
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if shapes:
        raise CheckpointError(f"{path}: shape mismatch for {meta['model']}: {_short(shapes)}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta


def _short(items: list, n: int = 3) -> str:
    if not items:
        return "none"
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
