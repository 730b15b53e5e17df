"""What a training run builds before its first epoch, on every process: the model (with its pretrained
weights and frozen BatchNorm, when asked), the training loader over every source and one validation
loader per source."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from model import create_model, head_prefixes
from pipeline.data.contract import LoaderSpec
from pipeline.data.loader import build_loader
from pipeline.data.shards import verify_shards
from pipeline.scoring.errors import ValGrid
from pipeline.training.optim import freeze_bn_params
from pipeline.training.rundir import RunError, check_pack, check_run_dir, lock_run_dir
from pipeline.training.sources import source_names
from shard_tools.storage import parse_storage_options

logger = logging.getLogger("pipeline.train")


def build_model(cfg) -> Tuple[nn.Module, Optional[Tuple[str, ...]]]:
    """``cfg.model`` seeded from ``cfg.seed``, with ``--pretrained`` weights loaded and ``--freeze-bn``
    applied; and the head's state-dict prefixes when the backbone is pretrained (else None)."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    model = create_model(cfg.model, **cfg.model_kwargs())
    head = None
    if cfg.pretrained is not None:
        from model.pretrained import load_pretrained

        report = load_pretrained(model, cfg.model, cfg.pretrained)
        head = head_prefixes(model)
        logger.info("--pretrained %s: %d tensors loaded into %s from %s; the classifier head (%s) is new and "
                    "randomly initialised (expected: one logit instead of the source's classes); backbone lr = "
                    "--lr x %g", cfg.pretrained, report["loaded"], cfg.model, report["file"],
                    ", ".join(report["new_head"]), cfg.backbone_lr_scale)
    if cfg.freeze_bn:
        logger.info("--freeze-bn: %d BatchNorm layers keep their statistics and affine parameters",
                    freeze_bn_params(model))
    return model, head


class Setup:
    """Everything built before the first epoch (per process); `close` releases what `build` got so far."""

    def __init__(self) -> None:
        self.lock = self.train_loader = None
        self.val_loaders: Dict[str, Any] = {}

    def build(self, cfg, accelerator) -> None:
        world, out = accelerator.num_processes, Path(cfg.out)
        defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
        # Every rank checks before the main process writes anything, so all agree on the outcome.
        check_run_dir(out, cfg.to_dict(), resume=cfg.resume, defaults=defaults)
        self.lock = lock_run_dir(out, accelerator)
        check_run_dir(out, cfg.to_dict(), resume=cfg.resume, defaults=defaults)  # again: no other run writes now
        self.norm = cfg.norm()
        self.model, self.head = build_model(cfg)
        spec = LoaderSpec(cfg.data, "train", train=True, backend=cfg.backend, device=accelerator.device,
                          batch_size=cfg.batch_size, image_size=cfg.image_size, aug=cfg.aug_config(),
                          rank=accelerator.process_index, world_size=world, seed=cfg.seed, num_workers=cfg.workers,
                          storage_options=parse_storage_options(cfg.storage_options), cache_dir=cfg.cache_dir,
                          fakes=cfg.fakes, decode=cfg.decode, weights=cfg.data_weights, norm=self.norm)
        self.train_loader = build_loader(spec)
        self.names = source_names(cfg.sources)
        val_sources = [cfg.val_data or cfg.data] if len(cfg.sources) == 1 else list(cfg.sources)
        self.val_loaders = {name: build_loader(spec.replace(data=data, split="val", train=False, fakes="all",
                                                            aug=spec.aug.for_eval(), weights=None))
                            for name, data in zip(self.names, val_sources)}
        self.pack = {"train": _fingerprint(self.train_loader),
                     "val": "+".join(_fingerprint(v) for v in self.val_loaders.values())}
        check_pack(out, self.pack, resume=cfg.resume)
        if cfg.verify_data:
            for loader in (self.train_loader, *self.val_loaders.values()):
                for shardset in getattr(loader, "shardsets", [loader.shardset]):
                    verify_shards(shardset, cache_dir=cfg.cache_dir, progress=accelerator.is_main_process)
        self.backend = spec.backend
        steps = len(self.train_loader)
        if cfg.max_steps:
            steps = min(steps, cfg.max_steps)
        steps -= steps % cfg.grad_accum  # accumulation never spans two epochs
        if steps < 1:
            raise RunError(f"--grad-accum {cfg.grad_accum}: more than the {len(self.train_loader)} batches per epoch "
                           f"of each process; lower it or --batch-size")
        self.steps = steps
        self.n_train = self.train_loader.split_samples
        self.n_val = sum(loader.split_samples for loader in self.val_loaders.values())
        self.sources = self._table(cfg)
        faces = [getattr(s, "faces", None) for s in getattr(self.train_loader, "shardsets", [self.train_loader.shardset])]
        self.faces = faces[0] if all(f == faces[0] for f in faces) else None  # the framing travels with the model
        self.val_grid = None  # the per-epoch heat maps of a few fixed val images (main process only)
        first_val = next(iter(self.val_loaders.values()))
        if accelerator.is_main_process and cfg.explain_val:
            self.val_grid = ValGrid.from_shards(first_val.shardset.shards, cfg.explain_val,
                                                image_size=cfg.image_size, preprocess=spec.aug.preprocess)
        if len(self.sources) > 1:
            for s in self.sources:
                logger.info("source %s: %s, %d train samples, %d per epoch (%.1f%%%s), %d val samples", s["name"],
                            s["data"], s["train_samples"], s["epoch_samples"], 100 * s["share"],
                            "" if s["weight"] is None else f", weight {s['weight']:g}", s["val_samples"])

    def _table(self, cfg) -> List[Dict[str, Any]]:
        """Per source: name, data, stated weight, train samples, samples per epoch and their share, val samples."""
        plan = getattr(self.train_loader, "plan", None)
        total = max(1, self.n_train)
        rows = []
        for i, (name, data) in enumerate(zip(self.names, cfg.sources)):
            train = plan.sources[i].samples if plan is not None else self.n_train
            quota = plan.sources[i].quota if plan is not None else self.n_train
            rows.append({"name": name, "data": data, "weight": cfg.data_weights[i] if cfg.data_weights else None,
                         "train_samples": train, "epoch_samples": quota, "share": quota / total,
                         "val_samples": self.val_loaders[name].split_samples})
        return rows

    def close(self) -> None:
        """Release the loaders' pipelines (DALI) now rather than at interpreter exit, then the run folder."""
        for loader in (self.train_loader, *self.val_loaders.values()):
            close = getattr(loader, "close", None)
            if close is not None:
                close()
        if self.lock is not None:
            self.lock.__exit__(None, None, None)
            self.lock = None


def _fingerprint(loader) -> str:
    """The pack identity of a loader's data (`ShardSet.fingerprint`; several sources joined by '+')."""
    return "+".join(str(s.fingerprint) for s in getattr(loader, "shardsets", [loader.shardset]))
