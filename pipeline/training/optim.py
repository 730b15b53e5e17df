"""Optimizer and learning-rate schedule of a training run (no weight decay on BN and biases), and the
fine-tuning knobs: a lower learning rate for a pretrained backbone, frozen BatchNorm."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, *,
                    head: Optional[Sequence[str]] = None, backbone_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD; weight decay only on conv/linear weights, never on BN parameters or biases.

    ``head``: state-dict prefixes of the new head (`model.head_prefixes`); every other parameter (the
    pretrained backbone) then learns at ``lr * backbone_lr_scale``. The head's groups come first, so the
    first group's learning rate is ``--lr``'s schedule. Frozen parameters (``requires_grad=False``) are left out.
    """
    decay, no_decay, bb_decay, bb_no_decay = [], [], [], []
    for key, p in model.named_parameters():
        if not p.requires_grad:
            continue
        backbone = head is not None and not any(key.startswith(h) for h in head)
        target = (bb_decay, bb_no_decay) if backbone else (decay, no_decay)
        target[0 if p.ndim > 1 else 1].append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if head is not None:
        groups += [{"params": bb_decay, "weight_decay": weight_decay, "lr": lr * backbone_lr_scale},
                   {"params": bb_no_decay, "weight_decay": 0.0, "lr": lr * backbone_lr_scale}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "adam":
        # Adam's weight_decay is L2 in the gradient (the original used none).
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise ValueError(f"--optimizer {name!r}: choose one of adamw, adam, sgd")


def build_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, total_steps: int, warmup_steps: int,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimizer-step LR multiplier: linear warmup, then cosine to ``min_lr_ratio`` (or constant)."""
    total_steps = max(1, total_steps)
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batchnorms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_bn_params(model: nn.Module) -> int:
    """``requires_grad=False`` on every BatchNorm layer's scale and shift (before the optimizer is built);
    returns the number of layers."""
    layers = _batchnorms(model)
    for m in layers:
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
    return len(layers)


def bn_eval(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode (after ``model.train()``): running statistics used, not updated."""
    for m in _batchnorms(model):
        m.eval()
