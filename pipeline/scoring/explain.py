"""Class-activation heat maps of a detector's decision (Grad-CAM family, the ``grad-cam`` package).

    explainer = Explainer.for_model(model, image_size=96)            # target layer chosen automatically
    scores, heatmaps = explainer.explain(images)                     # normalised float NCHW, any device
    scores, heatmaps = explain_batch(model, images, layer="stages.2") # the same in one call

``heatmaps`` is float32 ``[N, H, W]`` in [0, 1] at the input's own size (so for an NPR model the map lies
over the image, not over the residual the network computes inside ``forward``); ``scores`` is P(fake) of
the same forward pass. The map explains the *predicted* class by default (``target="predicted"``: the
logit for images called fake, minus the logit for images called real); ``"fake"``/``"real"`` fix it.

The default layer is the network's last stage (`default_layer`): the last convolutional block whose map
is at least ``MIN_MAP`` x ``MIN_MAP`` at the model's input size. A 1x1 map shows nothing, and a 2x2 one
of a small input did not place the evidence (a tiny model at 64 px whose decision rests on one quadrant
put the maximum there for 31-69% of images at its 2x2 last stage, 94-100% one stage earlier, at 4x4;
the CPU recipe's model at 96 px: 100% at its 3x3 last stage). Any layer whose output is a spatial map may
be named (`layer_names`).

Gradients: the parameters are switched to ``requires_grad=False`` for the pass (and restored) and the
input gets the gradient instead, so a model with frozen weights works, nothing accumulates in the
weights' ``.grad`` (a training run is not disturbed) and no DDP gradient hook fires. A model that
gives no gradient at all (an exported ONNX graph, a forward under ``torch.no_grad``) is an
`ExplainError`, one line, as are a layer that does not exist and a missing ``grad-cam`` package.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from model import NPRFilter
from pipeline.augment.batch_ops import normalize

# --cam-method -> the grad-cam class (all take the same arguments; the gradient-free ones are left out)
METHODS: Dict[str, str] = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM",
                           "layercam": "LayerCAM", "xgradcam": "XGradCAM"}
TARGETS = ("predicted", "fake", "real")
INSTALL = "pip install grad-cam  (the maintained pytorch-grad-cam package)"
MIN_MAP = 3  # smallest side of the default layer's map (see the module docstring)


class ExplainError(ValueError):
    """An explanation that cannot be made; one line naming the flag or the cause."""


def _cam_class(method: str):
    if method not in METHODS:
        raise ExplainError(f"--cam-method {method!r}: choose one of {', '.join(METHODS)}")
    try:
        import pytorch_grad_cam
    except ImportError:
        raise ExplainError(f"heat maps need the grad-cam package, which is not installed: {INSTALL}") from None
    return getattr(pytorch_grad_cam, METHODS[method])


def _check_module(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ExplainError(f"cannot explain a {type(model).__name__}: heat maps need the PyTorch model's gradients, "
                           "which an exported (ONNX) or frozen graph does not have; use the .safetensors checkpoint")
    return model


def _skipped(module: nn.Module) -> bool:
    # the input as it is, the NPR residual, the global pool: nothing a heat map can be made of
    return isinstance(module, (nn.Identity, NPRFilter, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))


def spatial_layers(model: nn.Module, image_size: int) -> Dict[str, Tuple[int, int]]:
    """``{name: (h, w)}`` of every sub-module whose output is a ``[N, C, H, W]`` map for a
    ``3 x image_size x image_size`` input, in module order (one probe pass, no gradient)."""
    _check_module(model)
    shapes: Dict[str, Tuple[int, int]] = {}
    hooks = []
    for name, module in model.named_modules():
        if name and not _skipped(module):
            def hook(_m, _i, out, name=name):
                if isinstance(out, torch.Tensor) and out.ndim == 4:
                    shapes[name] = (int(out.shape[-2]), int(out.shape[-1]))
            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return {name: shapes[name] for name, _ in model.named_modules() if name in shapes}


def layer_names(model: nn.Module, image_size: int) -> List[str]:
    """The block-level names ``--cam-layer`` takes (two levels deep; deeper sub-layers are accepted too)."""
    return [n for n in spatial_layers(model, image_size) if n.count(".") <= 1]


def default_layer(model: nn.Module, image_size: int) -> str:
    """The last stage (``stages.K`` of DeepfakeNet; the last conv elsewhere) whose map is at least
    ``MIN_MAP`` px a side at ``image_size``; the one with the largest map when none is."""
    shapes = spatial_layers(model, image_size)
    nets = [(n, m.stages) for n, m in model.named_modules() if isinstance(getattr(m, "stages", None), nn.Sequential)]
    if nets and len(nets[0][1]):  # DeepfakeNet, also inside a wrapper (DDP's .module, a compiled model)
        prefix = f"{nets[0][0]}." if nets[0][0] else ""
        names = [f"{prefix}stages.{i}" for i in range(len(nets[0][1]))]
    else:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    names = [n for n in names if n in shapes]
    if not names:
        raise ExplainError(f"{type(model).__name__} has no convolutional layer to explain")
    big = [n for n in names if min(shapes[n]) >= MIN_MAP]
    return big[-1] if big else max(reversed(names), key=lambda n: min(shapes[n]))


def resolve_layer(model: nn.Module, layer: Optional[str], image_size: int) -> str:
    """``layer`` checked against the model (ExplainError listing the valid names), or the default."""
    if layer is None:
        return default_layer(model, image_size)
    shapes = spatial_layers(model, image_size)
    if layer not in shapes:
        valid = [n for n in shapes if n.count(".") <= 1]
        what = "is not a layer with a spatial output" if layer in dict(model.named_modules()) else "no such layer"
        deeper = [n for n in shapes if n.count(".") == 2]
        raise ExplainError(f"--cam-layer {layer}: {what} in this model; choose one of {', '.join(valid)}"
                           + (f" (or a layer inside one, e.g. {deeper[-1]})" if deeper else ""))
    return layer


class _Target:
    """What the map explains for one image: its logit (fake), minus it (real), or the predicted class."""

    def __init__(self, target: str, threshold: float) -> None:
        self.sign = {"fake": 1.0, "real": -1.0}.get(target)
        self.threshold = threshold

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        logit = output.reshape(-1)[0]
        sign = self.sign
        if sign is None:
            sign = 1.0 if float(torch.sigmoid(logit.detach().float())) >= self.threshold else -1.0
        return logit * sign


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t.float()  # bf16/fp16 activations under autocast: grad-cam converts them to numpy


@dataclass
class Explainer:
    """Heat maps of ``model`` at ``layer`` (a resolved name; build with `for_model` to check it)."""

    model: nn.Module
    layer: str
    method: str = "gradcam"
    target: str = "predicted"
    threshold: float = 0.5

    @classmethod
    def for_model(cls, model, *, image_size: int, layer: Optional[str] = None, method: str = "gradcam",
                  target: str = "predicted", threshold: float = 0.5) -> "Explainer":
        """Check everything once (module, method, installed package, layer, target): ExplainError otherwise."""
        _check_module(model)
        _cam_class(method)
        if target not in TARGETS:
            raise ExplainError(f"target {target!r}: choose one of {', '.join(TARGETS)}")
        return cls(model, resolve_layer(model, layer, image_size), method, target, threshold)

    def explain(self, images: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
        """P(fake) ``[N]`` and heat maps ``[N, H, W]`` in [0, 1] of normalised float NCHW ``images``."""
        model, n = self.model, len(images)
        if n == 0:
            return np.zeros(0), np.zeros((0, *images.shape[-2:]), np.float32)
        params = list(model.parameters())
        flags = [p.requires_grad for p in params]
        was_training = model.training
        try:
            for p in params:
                p.requires_grad_(False)
            with torch.inference_mode(False), torch.enable_grad():
                return self._run(images.detach().clone().float(), n)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
            model.train(was_training)

    def _run(self, x: torch.Tensor, n: int) -> Tuple[np.ndarray, np.ndarray]:
        x.requires_grad_(True)
        layer = dict(self.model.named_modules())[self.layer]
        cam = _cam_class(self.method)(self.model, [layer], reshape_transform=_as_float)
        try:
            heat = cam(input_tensor=x, targets=[_Target(self.target, self.threshold)] * n)
            logits = cam.outputs.detach().float().reshape(n, -1)[:, 0]
        except (RuntimeError, AttributeError, TypeError) as e:
            if not cam.activations_and_grads.gradients:
                raise ExplainError(f"no gradient reaches layer {self.layer}: the model runs without autograd "
                                   "(an exported or frozen graph); explain with the trainable PyTorch model") from None
            raise ExplainError(f"grad-cam failed at layer {self.layer}: {type(e).__name__}: "
                               f"{' '.join(str(e).split())[:200]}") from None
        finally:
            cam.activations_and_grads.release()
        if not np.isfinite(heat).all():
            heat = np.nan_to_num(heat, nan=0.0, posinf=1.0, neginf=0.0)
        return torch.sigmoid(logits).cpu().numpy().astype(np.float64), np.asarray(heat, np.float32)


def explain_batch(model, images: torch.Tensor, *, layer: Optional[str] = None, method: str = "gradcam",
                  target: str = "predicted", threshold: float = 0.5) -> Tuple[np.ndarray, np.ndarray]:
    """(P(fake) ``[N]``, heat maps ``[N, H, W]``) of a batch of normalised float NCHW images (see the module
    docstring); resolves the layer on every call: use `Explainer` to explain many batches."""
    size = min(int(images.shape[-2]), int(images.shape[-1]))
    return Explainer.for_model(model, image_size=size, layer=layer, method=method, target=target,
                               threshold=threshold).explain(images)


def explain_views(explainer: Explainer, views: Sequence[torch.Tensor], *, device: torch.device | str = "cpu",
                  batch_size: int = 32) -> Tuple[np.ndarray, List[np.ndarray]]:
    """P(fake) and one heat map per uint8 CHW view (images, crops or video frames of any sizes): views of
    one shape go through together, ``batch_size`` at a time."""
    device = torch.device(device)
    scores = np.full(len(views), np.nan)
    maps: List[Optional[np.ndarray]] = [None] * len(views)
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for i, v in enumerate(views):
        groups.setdefault(tuple(v.shape), []).append(i)
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            part = idx[start:start + batch_size]
            x = normalize(torch.stack([views[i] for i in part]).to(device))
            s, h = explainer.explain(x)
            scores[part] = s
            for j, i in enumerate(part):
                maps[i] = h[j]
    return scores, maps  # type: ignore[return-value]
