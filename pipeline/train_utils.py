"""Pieces of `pipeline.train`: optimisation recipe, one training epoch, evaluation across ranks, run dir.

Everything here takes its inputs explicitly (accelerator, model, loader, config); the run-dir
helpers write every file atomically and only on the main process.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from torch import nn
from tqdm.auto import tqdm

from pipeline.loaders import drop_repeats
from pipeline.metrics import binary_metrics, to_jsonable
from shard_tools.fsutil import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "val_acc", "val_auc", "val_ap", "val_eer",
                  "img_s", "data_wait_s", "compute_s", "lr")
STATE_DIR = "state"
PROGRESS = "progress.json"
# Fault injection for the resume test: "EPOCH:STEP" SIGKILLs the process after that training step.
KILL_ENV = "DEEPFAKE_TRAIN_KILL_AT"


class RunError(ValueError):
    """A run directory / setting problem the user must fix; the message names the flag or file."""


# --------------------------------------------------------------------------- optimisation

def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD; weight decay only on conv/linear weights, never on BN parameters or biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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


def loss_per_sample(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """``bce``: BCE with logits. ``mse``: squared error of sigmoid(logit) against the 0/1 label."""
    logits = logits.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    if kind == "mse":
        return (torch.sigmoid(logits) - labels) ** 2
    raise ValueError(f"--loss {kind!r}: choose one of bce, mse")


# --------------------------------------------------------------------------- epochs

def _sync(device: torch.device) -> None:
    # CUDA work is asynchronous: without this, the wait for data would absorb the compute time.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class EpochStats:
    loss: float = math.nan
    samples: int = 0  # across all ranks
    steps: int = 0
    data_wait_s: float = 0.0
    compute_s: float = 0.0
    ids_checksum: int = 0  # this rank's train ids, order-independent (for the rank agreement check)

    @property
    def img_s(self) -> float:
        busy = self.data_wait_s + self.compute_s
        return self.samples / busy if busy > 0 else math.nan


def _kill_point() -> Optional[Tuple[int, int]]:
    value = os.environ.get(KILL_ENV)
    if not value:
        return None
    try:
        epoch, step = value.split(":")
        return int(epoch), int(step)
    except ValueError:
        raise RunError(f"{KILL_ENV}={value!r}: expected EPOCH:STEP, e.g. 2:1") from None


def train_epoch(accelerator, model: nn.Module, loader, optimizer, scheduler, *, epoch: int, steps: int,
                loss_kind: str, clip_grad: float, desc: str = "train") -> EpochStats:
    """One pass of ``steps`` batches; times the wait for each batch apart from the step itself."""
    import signal
    import zlib

    device = accelerator.device
    model.train()
    loader.set_epoch(epoch)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    stats = EpochStats()
    kill = _kill_point()
    bar = tqdm(total=steps, desc=f"{desc} {epoch}", disable=not accelerator.is_main_process, leave=False)
    it = iter(loader)
    _sync(device)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        batch = next(it)
        _sync(device)
        t1 = time.perf_counter()
        with accelerator.accumulate(model):
            with accelerator.autocast():
                logits = model(batch.images).squeeze(1)
            loss = loss_per_sample(logits, batch.labels, loss_kind).mean()
            accelerator.backward(loss)
            if clip_grad > 0 and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        n = len(batch.ids)
        loss_sum += loss.detach().double() * n
        count += n
        stats.ids_checksum = (stats.ids_checksum + sum(zlib.crc32(i.encode()) for i in batch.ids)) % (1 << 61)
        _sync(device)
        t2 = time.perf_counter()
        stats.data_wait_s += t1 - t0
        stats.compute_s += t2 - t1
        t0 = t2
        bar.update(1)
        if kill == (epoch, step):
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    del it  # stops the loader's workers when the epoch was cut short
    totals = accelerator.reduce(torch.stack([loss_sum, torch.tensor(float(count), device=device, dtype=torch.float64)]),
                                reduction="sum")
    stats.samples = int(totals[1].item())
    stats.loss = float(totals[0].item() / max(1, stats.samples))
    stats.steps = steps
    return stats


@torch.no_grad()
def evaluate(accelerator, model: nn.Module, loader, *, loss_kind: str, epoch: int, desc: str = "val") -> Dict[str, Any]:
    """Score this rank's part, gather ids/scores/labels/losses once, drop padded repeats, compute metrics.

    Every rank returns the same dict: `pipeline.metrics.binary_metrics` plus ``loss``.
    """
    model.eval()
    loader.set_epoch(epoch)
    ids: List[str] = []
    scores: List[float] = []
    labels: List[float] = []
    losses: List[float] = []
    for batch in tqdm(loader, total=len(loader), desc=f"{desc} {epoch}", disable=not accelerator.is_main_process, leave=False):
        with accelerator.autocast():
            logits = model(batch.images).squeeze(1)
        logits = logits.float()
        ids.extend(batch.ids)
        scores.extend(torch.sigmoid(logits).cpu().tolist())
        labels.extend(batch.labels.cpu().tolist())
        losses.extend(loss_per_sample(logits, batch.labels, loss_kind).cpu().tolist())
    rows = gather_object(list(zip(ids, scores, labels, losses)))
    if not rows:
        raise RunError("validation produced no samples: the val loader yielded nothing")
    all_ids, all_scores, all_labels, all_losses = drop_repeats(*(list(c) for c in zip(*rows)))
    metrics = binary_metrics(all_labels, all_scores)
    metrics["loss"] = float(sum(all_losses) / len(all_losses))
    metrics["ids"] = len(all_ids)
    return metrics


# --------------------------------------------------------------------------- run directory

def comparable(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The settings a resumed run must share with the saved one: all but ``resume`` and ``out``
    (the same folder by definition), with a local ``data`` path compared by its resolved path."""
    out = {k: v for k, v in config.items() if k not in ("resume", "out")}
    data = out.get("data")
    if isinstance(data, str) and Path(data).exists():
        out["data"] = str(Path(data).resolve())
    return out


def check_run_dir(out: Path, config: Mapping[str, Any], *, resume: bool) -> None:
    """Refuse to overwrite a run without ``--resume``, or to resume one made with other settings."""
    cfg_path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out}: is a file, expected a run directory")
    if not cfg_path.exists():
        if out.exists() and any(out.iterdir()) and not resume:
            raise RunError(f"--out {out}: folder exists and is not empty (no config.json); choose another --out")
        return
    if not resume:
        finished = (out / "summary.json").exists()
        what = "a finished run" if finished else "an unfinished run (pass --resume to continue it)"
        raise RunError(f"--out {out}: already holds {what}; choose another --out")
    try:
        saved = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{cfg_path}: cannot read it ({e}); cannot --resume this run") from None
    now, before = comparable(json.loads(json.dumps(config))), comparable(saved)
    diffs = [f"--{k.replace('_', '-')} {before.get(k)!r} (saved) vs {now.get(k)!r} (now)"
             for k in sorted(set(now) | set(before)) if now.get(k) != before.get(k)]
    if diffs:
        raise RunError(f"--resume: {cfg_path} was written with other settings: {'; '.join(diffs)}")


def latest_state(out: Path) -> Optional[Path]:
    """The newest complete ``state/epoch_NNNN`` folder (a complete one has progress.json), or None."""
    root = out / STATE_DIR
    done = sorted(p for p in root.glob("epoch_*") if (p / PROGRESS).exists()) if root.is_dir() else []
    return done[-1] if done else None


def save_training_state(accelerator, out: Path, epoch: int, progress: Mapping[str, Any]) -> Path:
    """``accelerator.save_state`` into a temp folder, then rename: a SIGKILL never leaves a half state."""
    root = out / STATE_DIR
    final = root / f"epoch_{epoch:04d}"
    tmp = root / f".tmp-epoch_{epoch:04d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / PROGRESS, to_jsonable(dict(progress)))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in root.glob("epoch_*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        for old in root.glob(".tmp-*"):
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_training_state(accelerator, state: Path) -> Dict[str, Any]:
    """``accelerator.load_state`` (model, optimizer, scheduler, RNG) and the saved progress."""
    accelerator.load_state(str(state))
    return json.loads((state / PROGRESS).read_text())


def write_metrics_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_COLUMNS})
    atomic_write_text(path, buf.getvalue())


@dataclass
class Progress:
    """What a resumed run needs besides the accelerate state: finished epochs and their results."""

    epoch: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    best_epoch: Optional[int] = None
    best_score: float = -math.inf
    best_metrics: Dict[str, Any] = field(default_factory=dict)
    train_time_s: float = 0.0

    def as_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "history": self.history, "best_epoch": self.best_epoch,
                "best_score": self.best_score, "best_metrics": self.best_metrics, "train_time_s": self.train_time_s}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Progress":
        score = d.get("best_score")
        return cls(epoch=int(d["epoch"]), history=list(d.get("history", [])), best_epoch=d.get("best_epoch"),
                   best_score=-math.inf if score is None else float(score),
                   best_metrics=dict(d.get("best_metrics") or {}), train_time_s=float(d.get("train_time_s", 0.0)))


def selection_score(val: Mapping[str, Any]) -> float:
    """Best-epoch criterion: validation ROC AUC, or minus the loss when AUC is undefined (one class)."""
    auc = val.get("roc_auc")
    if auc is not None and not math.isnan(auc):
        return float(auc)
    return -float(val["loss"]) - 10.0
