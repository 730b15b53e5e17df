"""The body of `pipeline.train`: set up accelerate, loaders and model, run the epochs, write RUN_DIR."""
from __future__ import annotations

import logging
import math
import platform
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from model import count_params
from pipeline.checkpoint import BEST, LAST, CheckpointError, save_checkpoint
from pipeline.data.shards import DataError
from pipeline.scoring.explain import ExplainError
from pipeline.scoring.metrics import HEADLINE, format_metrics, plot_history, tb_tag, to_jsonable
from pipeline.scoring.outputs import OutputError, out_of_memory, shown, writing
from pipeline.training.epoch import train_epoch, validate
from pipeline.training.optim import build_optimizer, build_scheduler
from pipeline.training.rundir import (
    METRIC_COLUMNS,
    Progress,
    RunError,
    latest_state,
    load_training_state,
    save_training_state,
    selection_score,
    source_columns,
    write_metrics_csv,
)
from pipeline.training.setup import Setup
from shard_tools.fsutil import atomic_write_json

logger = logging.getLogger("pipeline.train")


def run(cfg, *, on_step=None) -> int:
    """Train as ``cfg`` says; returns the exit code (2 with a one-line error for bad settings/data or a
    diverged run). ``on_step(epoch, step)`` runs after every training step (see `train_epoch`)."""
    from accelerate import Accelerator

    # step_scheduler_with_optimizer=False: a prepared scheduler would otherwise step num_processes
    # times per optimizer step, which assumes a dataloader that accelerate shards (ours is per rank).
    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.grad_accum, step_scheduler_with_optimizer=False)
    main_proc = accelerator.is_main_process
    if not main_proc:
        logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file save/load lines
    setup = Setup()
    try:
        try:
            setup.build(cfg, accelerator)
        except (ValueError, DataError, CheckpointError, OutputError) as e:
            if main_proc:
                logger.error("error: %s", shown(e))
            return 2
        try:
            return _train(cfg, accelerator, setup, on_step)
        except RunError as e:  # e.g. Diverged: every rank raises it together
            if main_proc:
                logger.error("error: %s", shown(e))
            return 2
        except (DataError, OutputError, RuntimeError, MemoryError) as e:  # met by this rank alone: it says so
            line = shown(e) if isinstance(e, (DataError, OutputError)) else out_of_memory(e, cfg.image_size, cfg.batch_size)
            if line is None:
                raise
            where = f"rank {accelerator.process_index}: " if accelerator.num_processes > 1 else ""
            logger.error("error: %s%s", where, line)
            return 2
    finally:
        setup.close()
        accelerator.end_training()


def _prepare(cfg, accelerator, setup: Setup):
    """Model (built and seeded by `Setup`), optimizer and schedule, prepared by accelerate; the progress of
    a resumed run."""
    model = setup.model
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, head=setup.head,
                                backbone_lr_scale=cfg.backbone_lr_scale)
    opt_steps = setup.steps // cfg.grad_accum
    scheduler = build_scheduler(optimizer, schedule=cfg.schedule, total_steps=cfg.epochs * opt_steps,
                                warmup_steps=round(cfg.warmup_epochs * opt_steps), min_lr_ratio=cfg.min_lr_ratio)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    out = Path(cfg.out)
    progress = Progress()
    state = latest_state(out) if cfg.resume else None
    if state is not None:
        progress = Progress.from_dict(load_training_state(accelerator, state))
        logger.info("resuming %s after epoch %d (state %s)", out, progress.epoch, state)
    elif cfg.resume:
        logger.info("--resume: %s has no saved state; starting from epoch 1", out)
    return model, optimizer, scheduler, progress


def _train(cfg, accelerator, setup: Setup, on_step=None) -> int:
    out = Path(cfg.out)
    main_proc = accelerator.is_main_process
    model, optimizer, scheduler, progress = _prepare(cfg, accelerator, setup)
    if main_proc:
        with writing(out / "config.json"):
            atomic_write_json(out / "config.json", {**cfg.to_dict(), "pack": setup.pack})
    accelerator.wait_for_everyone()
    if progress.epoch >= cfg.epochs and (out / "summary.json").exists():
        logger.info("%s already finished all %d epochs; nothing to do", out, cfg.epochs)
        return 0
    tb = None
    if main_proc:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / "tb"), purge_step=progress.epoch + 1)  # drops events of an unfinished epoch
    world = accelerator.num_processes
    logger.info("%s: %s params, %d process(es) on %s (%s, mixed precision %s), %d steps/epoch of %d x %d, %s backend",
                cfg.model, f"{count_params(accelerator.unwrap_model(model)):,}", world, accelerator.device,
                accelerator.distributed_type.value, accelerator.mixed_precision, setup.steps, cfg.batch_size, world,
                setup.backend)
    ids_checksum = 0
    for epoch in range(progress.epoch + 1, cfg.epochs + 1):
        ids_checksum = _epoch(cfg, accelerator, setup, (model, optimizer, scheduler), progress, epoch, tb, on_step)
    if tb is not None:
        tb.close()
    _write_final(cfg, out, accelerator, model, setup, progress, ids_checksum)
    return 0


def _epoch(cfg, accelerator, setup: Setup, prepared, progress: Progress, epoch: int, tb, on_step=None) -> int:
    """Train and validate one epoch, record it, write the epoch's outputs; returns the ids checksum."""
    model, optimizer, scheduler = prepared
    t_epoch = time.perf_counter()
    tr = train_epoch(accelerator, model, setup.train_loader, optimizer, scheduler, epoch=epoch,
                     steps=setup.steps, loss_kind=cfg.loss, clip_grad=cfg.clip_grad, freeze_bn=cfg.freeze_bn,
                     on_step=on_step)
    t_val = time.perf_counter()
    val = validate(accelerator, model, setup.val_loaders, loss_kind=cfg.loss, epoch=epoch)
    val_s = time.perf_counter() - t_val
    row = {"epoch": epoch, "train_loss": tr.loss, "val_loss": val["loss"], **{f"val_{k}": val[k] for k in HEADLINE},
           "img_s": tr.img_s, "data_wait_s": tr.data_wait_s, "compute_s": tr.compute_s,
           "lr": scheduler.get_last_lr()[0], "val_s": val_s, "train_samples": tr.samples}
    for name, m in val.get("sources", {}).items():
        row.update({f"val_{k}/{name}": m[k] for k in ("loss", *HEADLINE)})
    progress.history.append(to_jsonable(row))
    progress.epoch = epoch
    progress.train_time_s += time.perf_counter() - t_epoch
    score = selection_score(val)
    improved = score > progress.best_score
    if improved:
        progress.best_score, progress.best_epoch, progress.best_metrics = score, epoch, to_jsonable(val)
    if accelerator.is_main_process:
        _write_epoch_outputs(cfg, setup, accelerator.unwrap_model(model), val, progress, improved, tb)
        _log_val_grid(setup, accelerator.unwrap_model(model), tb, epoch)
    logger.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  %s  | %.0f img/s, data wait %.1f s, compute %.1f s, "
                "val %.1f s%s", epoch, cfg.epochs, tr.loss, val["loss"], format_metrics(val), tr.img_s,
                tr.data_wait_s, tr.compute_s, val_s, "  (best)" if improved else "")
    for name, m in val.get("sources", {}).items():
        logger.info("  val %s (%d images): loss %.4f  %s", name, m["n"], m["loss"], format_metrics(m))
    save_training_state(accelerator, Path(cfg.out), epoch, progress.as_dict())
    return tr.ids_checksum


def _write_epoch_outputs(cfg, setup: Setup, model, val: Dict[str, Any], progress: Progress, improved: bool, tb) -> None:
    """last/best checkpoints, metrics.csv, curves.png, TensorBoard scalars; OutputError naming a file that
    cannot be written (each file is atomic: a failed write leaves the previous epoch's version)."""
    out = Path(cfg.out)
    meta = {"epoch": progress.epoch, "metrics": {k: v for k, v in val.items() if k != "ids"},
            "model_kwargs": cfg.model_kwargs(), "train_config": cfg.to_dict(), "preprocess": cfg.aug_config().preprocess}
    if len(setup.sources) > 1:
        meta["sources"] = setup.sources
    if setup.faces is not None:
        meta["faces"] = setup.faces
    for name in (LAST, BEST) if improved else (LAST,):
        with writing(out / name, "checkpoint"):
            save_checkpoint(out / name, model, model_name=cfg.model, image_size=cfg.image_size, extra=meta,
                            norm=setup.norm)
    extra = source_columns(setup.names) if len(setup.sources) > 1 else []
    with writing(out / "metrics.csv"):
        write_metrics_csv(out / "metrics.csv", progress.history, extra)
    with writing(out / "curves.png"):
        plot_history(progress.history, out / "curves.png", title=f"{cfg.model} on {shown('+'.join(setup.names))}")
    row = progress.history[-1]
    for key in (*METRIC_COLUMNS[1:], *extra):
        if row.get(key) is not None:
            tb.add_scalar(tb_tag(key), row[key], progress.epoch)
    tb.flush()


def _log_val_grid(setup: Setup, model, tb, epoch: int) -> None:
    """The explained val grid of this epoch into TensorBoard; a grid that cannot be made is switched off."""
    if setup.val_grid is None:
        return
    try:
        tb.add_image("explain/val", setup.val_grid.image(model, title=f"epoch {epoch}"), epoch, dataformats="HWC")
        tb.flush()
    except ExplainError as e:
        logger.warning("explanation grid switched off: %s", e)
        setup.val_grid = None


def _param_checksum(model) -> float:
    with torch.no_grad():
        return float(sum(p.detach().double().sum().item() for p in model.parameters()))


def _write_final(cfg, out: Path, accelerator, model, setup: Setup, progress: Progress, ids_checksum: int) -> None:
    last = progress.history[-1] if progress.history else {}
    rank_info = {
        "process_index": accelerator.process_index, "num_processes": accelerator.num_processes,
        "steps_per_epoch": setup.steps, "train_samples_per_epoch": setup.steps * cfg.batch_size,
        "train_ids_checksum_last_epoch": ids_checksum, "epochs": progress.epoch,
        "param_checksum": _param_checksum(accelerator.unwrap_model(model)),
        "final_val": {k: last.get(k) for k in METRIC_COLUMNS if k.startswith("val_")},
    }
    rank_file = out / "ranks" / f"rank-{accelerator.process_index}.json"
    with writing(rank_file):
        atomic_write_json(rank_file, to_jsonable(rank_info))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    import accelerate

    summary = {
        "tool": "deepfake-train", "model": cfg.model, "params": count_params(accelerator.unwrap_model(model)),
        "image_size": cfg.image_size, "num_processes": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value, "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "device_name": torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else platform.processor() or "cpu",
        "backend": setup.backend, "epochs": progress.epoch, "steps_per_epoch": setup.steps,
        "global_batch_size": cfg.batch_size * accelerator.num_processes * cfg.grad_accum,
        "train_samples": setup.n_train, "val_samples": setup.n_val, "sources": setup.sources,
        "pretrained": cfg.pretrained, "norm": {"mean": list(setup.norm[0]), "std": list(setup.norm[1])},
        "best_epoch": progress.best_epoch, "best": progress.best_metrics, "final": last,
        "train_time_s": progress.train_time_s,
        "mean_img_s": _mean([r.get("img_s") for r in progress.history]),
        "data_wait_fraction": _ratio(progress.history),
        "checkpoints": {"best": BEST, "last": LAST},
        "versions": {"torch": torch.__version__, "accelerate": accelerate.__version__, "python": platform.python_version()},
    }
    with writing(out / "summary.json"):
        atomic_write_json(out / "summary.json", to_jsonable(summary))
    best = progress.best_metrics
    logger.info("done: best epoch %s  val acc %.4f  AUC %.4f  EER %.4f  -> %s", progress.best_epoch,
                best.get("accuracy") or math.nan, best.get("roc_auc") or math.nan, best.get("eer") or math.nan, out)


def _mean(values) -> Optional[float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _ratio(history) -> Optional[float]:
    wait = sum(r.get("data_wait_s") or 0.0 for r in history)
    busy = wait + sum(r.get("compute_s") or 0.0 for r in history)
    return wait / busy if busy > 0 else None
