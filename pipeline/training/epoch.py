"""One training epoch and one validation pass over a rank's loader, with the data-wait vs compute split."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from torch import nn
from tqdm.auto import tqdm

from pipeline.data.contract import drop_repeats
from pipeline.scoring.metrics import binary_metrics
from pipeline.training.optim import bn_eval
from pipeline.training.rundir import RunError


def loss_per_sample(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """``bce``: BCE with logits. ``mse``: squared error of sigmoid(logit) against the 0/1 label."""
    logits = logits.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    if kind == "mse":
        return (torch.sigmoid(logits) - labels) ** 2
    raise ValueError(f"--loss {kind!r}: choose one of bce, mse")


def _sync(device: torch.device) -> None:
    # CUDA work is asynchronous: without this, the wait for data would absorb the compute time.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class EpochStats:
    loss: float = math.nan
    samples: int = 0  # across all ranks
    data_wait_s: float = 0.0
    compute_s: float = 0.0
    ids_checksum: int = 0  # this rank's train ids, order-independent (for the rank agreement check)

    @property
    def img_s(self) -> float:
        busy = self.data_wait_s + self.compute_s
        return self.samples / busy if busy > 0 else math.nan




class Diverged(RunError):
    """The training loss became NaN or infinite."""


def _check_finite(accelerator, loss: torch.Tensor, epoch: int, step: int) -> None:
    """Raise `Diverged` on every rank when the loss of any rank is not finite (one tiny all-reduce:
    a rank that stopped alone would leave the others waiting in the next gradient all-reduce)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        raise Diverged(f"training diverged at epoch {epoch} step {step} (loss {loss.item():.4g}); "
                       "lower --lr, or raise --warmup-epochs / --clip-grad")


def train_epoch(accelerator, model: nn.Module, loader, optimizer, scheduler, *, epoch: int, steps: int,
                loss_kind: str, clip_grad: float, desc: str = "train", freeze_bn: bool = False,
                on_step: Optional[Callable[[int, int], None]] = None) -> EpochStats:
    """One pass of ``steps`` batches; times the wait for each batch apart from the step itself.

    ``on_step(epoch, step)`` runs after each step (tests use it to kill a run mid-epoch). A
    non-finite loss on any rank stops every rank with `Diverged` (all ranks agree, none hangs).
    ``freeze_bn``: BatchNorm layers stay in eval mode (`pipeline.training.optim.bn_eval`).
    """
    import zlib

    device = accelerator.device
    model.train()
    if freeze_bn:
        bn_eval(model)
    loader.set_epoch(epoch)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    stats = EpochStats()
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
        _check_finite(accelerator, loss, epoch, step)
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
        if on_step is not None:
            on_step(epoch, step)
    bar.close()
    del it  # stops the loader's workers when the epoch was cut short
    totals = accelerator.reduce(torch.stack([loss_sum, torch.tensor(float(count), device=device, dtype=torch.float64)]),
                                reduction="sum")
    stats.samples = int(totals[1].item())
    stats.loss = float(totals[0].item() / max(1, stats.samples))
    return stats


@torch.no_grad()
def evaluate(accelerator, model: nn.Module, loader, *, loss_kind: str, epoch: int, desc: str = "val") -> Dict[str, Any]:
    """Score this rank's part, gather ids/scores/labels/losses once, drop padded repeats, compute metrics.

    Every rank returns the same dict: `pipeline.scoring.metrics.binary_metrics` plus ``loss``.
    """
    return _metrics(_gathered(accelerator, model, loader, loss_kind=loss_kind, epoch=epoch, desc=desc))


def validate(accelerator, model: nn.Module, loaders: Dict[str, Any], *, loss_kind: str, epoch: int) -> Dict[str, Any]:
    """`evaluate` over the val loader of every source: one source -> its metrics; several -> the metrics of
    all their samples together, plus ``sources``: ``{name: metrics}`` of each on its own."""
    if len(loaders) == 1:
        return evaluate(accelerator, model, next(iter(loaders.values())), loss_kind=loss_kind, epoch=epoch)
    per, together = {}, [[], [], [], []]
    for name, loader in loaders.items():
        cols = _gathered(accelerator, model, loader, loss_kind=loss_kind, epoch=epoch, desc=f"val {name}")
        per[name] = _metrics(cols)
        together[0] += [f"{name}/{i}" for i in cols[0]]  # the same image in two sources counts in each
        for dst, src in zip(together[1:], cols[1:]):
            dst += src
    metrics = _metrics(tuple(together))
    metrics["sources"] = per
    return metrics


def _metrics(cols) -> Dict[str, Any]:
    all_ids, all_scores, all_labels, all_losses = cols
    metrics = binary_metrics(all_labels, all_scores)
    metrics["loss"] = float(sum(all_losses) / len(all_losses))
    metrics["ids"] = len(all_ids)
    return metrics


@torch.no_grad()
def _gathered(accelerator, model: nn.Module, loader, *, loss_kind: str, epoch: int, desc: str):
    """(ids, scores, labels, losses) of every sample of ``loader``'s split, gathered from all ranks, each once."""
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
    return drop_repeats(*(list(c) for c in zip(*rows)))
