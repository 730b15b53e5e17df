"""Model checkpoints: safetensors weights + string metadata, so evaluate/predict/export need no flags.

A checkpoint is one ``.safetensors`` file holding the unwrapped model's ``state_dict()`` and the
metadata (every value a string, as safetensors requires)::

    format="deepfake-detector/1", model="deepfakenet_tiny", image_size="64",
    mean="[0.485, 0.456, 0.406]", std="[...]", epoch="3", metrics="{...}", model_kwargs="{}"

``faces`` (when the training pack came from the face stage) holds its `FaceSettings`, so evaluate and
predict crop photos and videos the way the model was trained. No pickle anywhere. A run directory resolves to ``RUN_DIR/best.safetensors``. ``model_kwargs``
always holds the model's ``input_filter`` (``"none"`` / ``"npr"``): the filter has no weights, so
without it a checkpoint would load silently with the wrong input. A checkpoint without it (older
ones) gets the variant's default, ``"none"`` for the first three variants.

Loading treats the file as untrusted: every metadata field is parsed and bounded (`read_metadata`)
and ``model_kwargs`` checked by `model.validate_kwargs` before anything is built; tensor names and
shapes are compared from the header before any tensor is read; non-finite weights are refused. Every
failure is one `CheckpointError` line naming the file and the field or tensor.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from pipeline.augment.config import DEFAULT_NORM, PREPROCESS, Norm, check_norm
from shard_tools.fsutil import atomic_write_bytes, loads_json

FORMAT = "deepfake-detector/1"
BEST = "best.safetensors"
LAST = "last.safetensors"


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
    extra: Optional[Mapping[str, Any]] = None, norm: Norm = DEFAULT_NORM,
) -> Path:
    """Write the unwrapped ``model``'s weights and metadata to ``path`` atomically.

    ``norm``: the ``(mean, std)`` the model's inputs were normalised with (stored as ``mean``/``std``;
    evaluate, predict and export normalise with it: `norm_of`).

    ``extra`` adds metadata: ``epoch`` (int), ``metrics`` (dict), ``model_kwargs`` (dict passed to
    `model.create_model`, so a variant built with overrides loads back; the model's ``input_filter``
    is added to it) and any other key; values that are not strings are stored as JSON. Raises
    ValueError if ``model_kwargs`` names an ``input_filter`` other than the model's.
    """
    from safetensors.torch import save

    extra = dict(extra or {})
    kwargs = dict(extra.pop("model_kwargs", None) or {})
    actual = getattr(unwrap(model), "input_filter", None)
    if isinstance(actual, str):  # a DeepfakeNet: record its filter, which no weight would reveal
        if kwargs.setdefault("input_filter", actual) != actual:
            raise ValueError(f"{path}: model_kwargs input_filter={kwargs['input_filter']!r}, but the model's is {actual!r}")
    meta: Dict[str, str] = {
        "format": FORMAT, "model": str(model_name), "image_size": str(int(image_size)),
        "mean": json.dumps(list(norm[0])), "std": json.dumps(list(norm[1])),
        "epoch": json.dumps(extra.pop("epoch", None)),
        "metrics": json.dumps(_clean(extra.pop("metrics", {})), default=_json_default),
        "model_kwargs": json.dumps(_clean(kwargs), default=_json_default),
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


def _show(value: str, limit: int = 60) -> str:
    return repr(value) if len(value) <= limit else repr(value[: limit - 3]) + "..."


def _bad(path: Path, key: str, raw: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: metadata {key}={_show(raw)}: {problem}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Optional JSON fields: (rule, what is accepted). Absent ones are left out (older checkpoints).
_JSON_RULES = {
    "epoch": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10**6),
              "must be null or an int in [0, 1000000]"),
    "mean": (lambda v: isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v),
             "must be a JSON list of 3 finite numbers"),
    "std": (lambda v: isinstance(v, list) and len(v) == 3 and all(_is_number(x) and x > 0 for x in v),
            "must be a JSON list of 3 positive numbers"),
    "metrics": (lambda v: isinstance(v, dict), "must be a JSON object"),
    "model_kwargs": (lambda v: isinstance(v, dict), "must be a JSON object"),
}


def _parse_fields(path: Path, raw: Mapping[str, str]) -> Dict[str, Any]:
    """The decoded, bounded metadata; `CheckpointError` naming the first bad field."""
    from model import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, is_timm, list_models, validate_kwargs

    meta: Dict[str, Any] = dict(raw)
    for key in ("model", "image_size"):
        if key not in raw:
            raise CheckpointError(f"{path}: checkpoint metadata has no {key!r} field")
    if raw["model"] not in list_models() and not is_timm(raw["model"]):
        raise CheckpointError(f"{path}: metadata model: unknown model {_show(raw['model'])} "
                              f"(known: {', '.join(list_models())}, timm/NAME)")
    size = raw["image_size"].strip()
    if not (size.isascii() and size.isdigit() and MIN_IMAGE_SIZE <= int(size) <= MAX_IMAGE_SIZE):
        raise _bad(path, "image_size", raw["image_size"], f"must be an int in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]")
    meta["image_size"] = int(size)
    for key, (ok, accepted) in _JSON_RULES.items():
        if key not in raw:
            continue
        try:
            meta[key] = loads_json(raw[key])
        except (ValueError, RecursionError) as e:
            raise _bad(path, key, raw[key], f"not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
        if not ok(meta[key]):
            raise _bad(path, key, raw[key], accepted)
    meta.setdefault("epoch", None)
    meta.setdefault("model_kwargs", {})
    try:
        validate_kwargs(meta["model"], meta["model_kwargs"])
    except ValueError as e:
        raise CheckpointError(f"{path}: metadata model_kwargs: {e}") from None
    return meta


def read_metadata(path_or_run_dir: Union[str, Path]) -> Dict[str, Any]:
    """The decoded, validated metadata of a checkpoint, plus ``path``.

    ``image_size`` is an int in [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE], ``epoch`` null or an int, ``mean`` /
    ``std`` lists of 3 numbers, ``metrics`` and ``model_kwargs`` objects, ``model`` a registered
    variant and ``model_kwargs`` within `model.validate_kwargs`' bounds; anything else is a
    `CheckpointError` naming the file and the field. Nothing is built.
    """
    path = resolve_checkpoint(path_or_run_dir)
    try:
        with _safe_open(path) as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"{path}: not a safetensors file ({type(e).__name__}: {e})") from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: metadata format is {raw.get('format')!r}, expected {FORMAT!r} (not written by deepfake-train?)"
        )
    meta = _parse_fields(path, raw)
    meta["preprocess"] = raw.get("preprocess", "resize")  # how it was trained; older checkpoints resized
    if meta["preprocess"] not in PREPROCESS:
        raise CheckpointError(f"{path}: metadata field preprocess is {meta['preprocess']!r}, expected one of "
                              f"{', '.join(PREPROCESS)}")
    meta["faces"] = _faces(path, raw.get("faces"))
    meta["path"] = str(path)
    return meta


def _faces(path: Path, raw: Optional[str]) -> Optional[Dict[str, Any]]:
    """The face-stage settings of the pack it was trained on (validated), or None (trained on ready-made crops)."""
    if raw is None or raw == "null":
        return None
    from shard_tools.media.stage import FaceSettings

    try:
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise ValueError("not an object")
        return FaceSettings.from_dict(value).to_dict()
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: metadata faces={_show(raw)}: {e}") from None


def _read_state(path: Path, model_name: str, expected: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The tensors ``expected`` names, after checking names and shapes from the header alone."""
    try:
        with _safe_open(path, device="cpu") as f:
            names = set(f.keys())
            missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
            if missing or unexpected:
                raise CheckpointError(f"{path}: weights do not match {model_name}: missing keys {_short(missing)}, "
                                      f"unexpected keys {_short(unexpected)}")
            shapes = [f"{k} {tuple(f.get_slice(k).get_shape())} vs model {tuple(v.shape)}"
                      for k, v in expected.items() if tuple(f.get_slice(k).get_shape()) != tuple(v.shape)]
            if shapes:
                raise CheckpointError(f"{path}: shape mismatch for {model_name}: {_short(shapes)}")
            return {k: f.get_tensor(k) for k in expected}
    except CheckpointError:
        raise
    except Exception as e:  # the header parsed once already; a file changed or damaged since
        raise CheckpointError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def _safe_open(path: Path, **kwargs):
    """``safetensors.safe_open`` for any path: it takes only UTF-8 names, so a name that is not UTF-8 is
    opened here and handed over as ``/proc/self/fd/N`` (Linux); elsewhere it is a CheckpointError."""
    from safetensors import safe_open

    name = os.fspath(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        if not os.path.isdir("/proc/self/fd"):
            raise CheckpointError(f"{name.encode('utf-8', 'backslashreplace').decode()}: safetensors reads only file "
                                  "names that are valid UTF-8; rename the file") from None
        fd = os.open(name, os.O_RDONLY)
        try:
            with safe_open(f"/proc/self/fd/{fd}", framework="pt", **kwargs) as f:
                yield f
        finally:
            os.close(fd)
        return
    with safe_open(name, framework="pt", **kwargs) as f:
        yield f


def _check_finite(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        t = state[bad[0]]
        raise CheckpointError(
            f"{path}: tensor {bad[0]} {tuple(t.shape)} has {int(torch.isnan(t).sum())} NaN and "
            f"{int(torch.isinf(t).sum())} infinite values ({len(bad)} such tensors in all; did training diverge?)"
        )


def load_checkpoint(path_or_run_dir: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the model named in the metadata, load the weights strictly, return ``(model.eval(), meta)``.

    Raises `CheckpointError` naming the file for: a missing file, a run dir without best.safetensors,
    a file that is not safetensors (truncated, pickle, ...), a foreign format, bad or out-of-bounds
    metadata (`read_metadata`), missing/unexpected keys, a shape mismatch, or NaN/inf weights.
    """
    from model import create_model

    meta = read_metadata(path_or_run_dir)
    path = Path(meta["path"])
    try:
        with torch.device("meta"):  # shapes only: names and shapes are checked before anything is allocated
            skeleton = create_model(meta["model"], **meta["model_kwargs"])
        state = _read_state(path, meta["model"], skeleton.state_dict())
        _check_finite(path, state)
        model = create_model(meta["model"], **meta["model_kwargs"])
    except (TypeError, ValueError) as e:  # validated already (timm may be missing); kept as a last guard
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: cannot build {meta['model']} with model_kwargs {meta['model_kwargs']}: {e}") from None
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta


def norm_of(meta: Mapping[str, Any]) -> Norm:
    """The ``(mean, std)`` a checkpoint's model expects (`read_metadata`'s ``mean``/``std``; the default
    for a checkpoint without them)."""
    if "mean" not in meta or "std" not in meta:
        return DEFAULT_NORM
    return check_norm((meta["mean"], meta["std"]), f"{meta.get('path', 'checkpoint')}: metadata mean/std")


def _short(items: list, n: int = 3) -> str:
    if not items:
        return "none"
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
