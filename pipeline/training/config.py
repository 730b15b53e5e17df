"""TrainConfig: every training setting, validated on construction (errors name the flag); recipes of defaults."""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

from model import INPUT_FILTERS, is_timm, list_models, validate_kwargs
from pipeline.augment.config import DEFAULT_NORM, PREPROCESS, PRESETS, AugConfig, Norm, check_norm
from pipeline.data.contract import BACKEND_CHOICES, DECODE_CHOICES, check_image_size
from pipeline.data.shards import is_pattern
from pipeline.training.sources import check_sources, parse_data
from shard_tools.storage import option_names, parse_storage_options, redacted

OPTIMIZERS = ("adamw", "adam", "sgd")

LOSSES = ("bce", "mse")

SCHEDULES = ("cosine", "constant")

PRECISIONS = ("no", "fp16", "bf16")

MAX_EXPLAIN_VAL = 64

FAKES = ("all", "sbi-only")  # sbi-only: the split's fakes are left out of training (reals + pseudo-fakes)

# The original project's settings (Adam 1e-5, MSE, batch 32, 224 px, its augmentation, no schedule).
RECIPES: Dict[str, Dict[str, Any]] = {
    "seed": dict(optimizer="adam", lr=1e-5, weight_decay=0.0, loss="mse", batch_size=32, image_size=224,
                 aug="seed", schedule="constant", warmup_epochs=0.0, clip_grad=0.0),
}


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting; validated on construction (errors name the flag). Saved as config.json."""

    data: Union[str, Tuple[str, ...]]
    out: str
    data_weights: Optional[Tuple[float, ...]] = None
    val_data: Optional[str] = None
    storage_options: Optional[str] = None
    cache_dir: Optional[str] = None
    verify_data: bool = False
    model: str = "deepfakenet_base"
    input_filter: Optional[str] = None
    pretrained: Optional[str] = None
    backbone_lr_scale: float = 0.1
    freeze_bn: bool = False
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.05
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    clip_grad: float = 1.0
    loss: str = "bce"
    aug: str = "seed"
    preprocess: Optional[str] = None
    self_blend: float = 0.0
    sbi_mask: str = "face"
    fakes: str = "all"
    backend: str = "auto"
    decode: str = "auto"
    workers: int = 2
    grad_accum: int = 1
    seed: int = 0
    max_steps: int = 0
    recipe: Optional[str] = None
    cpu: bool = False
    mixed_precision: Optional[str] = None
    resume: bool = False
    explain_val: int = 8  # val images in the per-epoch TensorBoard heat-map grid (0: off); not a training setting

    def __post_init__(self) -> None:
        def choice(flag: str, value: Any, allowed) -> None:
            if value not in allowed:
                raise ValueError(f"--{flag} {value!r}: choose one of {', '.join(map(str, allowed))}")

        def at_least(flag: str, value: float, low: float) -> None:
            if not (value >= low):  # also rejects NaN
                raise ValueError(f"--{flag} {value}: must be >= {low}")

        self._check_model()
        check_image_size(self.image_size)
        if self.storage_options is not None:
            parse_storage_options(self.storage_options)
        if isinstance(self.data, (list, tuple)):
            object.__setattr__(self, "data", tuple(self.data))
            object.__setattr__(self, "data_weights", check_sources(self.data, self.data_weights, self.val_data,
                                                                   self.backend, self.fakes))
        elif self.data_weights is not None:
            raise ValueError(f"--data {self.data}: a weight needs several sources (--data A:0.7,B:0.3)")
        elif is_pattern(self.data) and self.val_data is None:
            raise ValueError(f"--data {self.data}: a shard pattern is one split; give the validation shards with "
                             "--val-data (a pack output folder gives both)")
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("loss", self.loss, LOSSES)
        choice("schedule", self.schedule, SCHEDULES)
        choice("aug", self.aug, PRESETS)
        if self.preprocess is not None:
            choice("preprocess", self.preprocess, PREPROCESS)
        choice("fakes", self.fakes, FAKES)
        if not 0.0 <= self.self_blend <= 1.0:
            raise ValueError(f"--self-blend {self.self_blend}: a probability in [0, 1]")
        if self.fakes == "sbi-only" and self.self_blend <= 0:
            raise ValueError("--fakes sbi-only: training then sees no fake at all; give --self-blend P (e.g. 0.5)")
        try:
            self.aug_config()
        except ValueError as e:
            raise ValueError(f"--aug {self.aug}: {e}") from None
        choice("backend", self.backend, BACKEND_CHOICES)
        choice("decode", self.decode, DECODE_CHOICES)
        if self.recipe is not None:
            choice("recipe", self.recipe, tuple(RECIPES))
        if self.mixed_precision is not None:
            choice("mixed-precision", self.mixed_precision, PRECISIONS)
        for flag, value in (("epochs", self.epochs), ("batch-size", self.batch_size), ("grad-accum", self.grad_accum)):
            at_least(flag, value, 1)
        for flag, value in (("workers", self.workers), ("max-steps", self.max_steps), ("weight-decay", self.weight_decay),
                            ("warmup-epochs", self.warmup_epochs), ("clip-grad", self.clip_grad),
                            ("explain-val", self.explain_val)):
            at_least(flag, value, 0)
        if self.explain_val > MAX_EXPLAIN_VAL:
            raise ValueError(f"--explain-val {self.explain_val}: at most {MAX_EXPLAIN_VAL} (a grid, not a data set)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr {self.lr}: must be a positive number")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio {self.min_lr_ratio}: must be in [0, 1]")
        if 0 < self.max_steps < self.grad_accum:
            raise ValueError(f"--max-steps {self.max_steps}: must be >= --grad-accum {self.grad_accum}")

    def _check_model(self) -> None:
        if not is_timm(self.model) and self.model not in list_models():
            raise ValueError(f"--model {self.model!r}: choose one of {', '.join(list_models())}, or timm/NAME "
                             "for any timm architecture")
        if self.input_filter is not None:
            if self.input_filter not in INPUT_FILTERS:
                raise ValueError(f"--input-filter {self.input_filter!r}: choose one of {', '.join(INPUT_FILTERS)}")
        try:
            validate_kwargs(self.model, self.model_kwargs())
        except ValueError as e:
            raise ValueError(f"--model {self.model}: {e}") from None
        if is_timm(self.model):
            from model.timm_backbone import pretrained_cfg

            cfg = pretrained_cfg(self.model)
            side = (cfg.get("input_size") or (3, 224, 224))[-1]
            if cfg.get("fixed_input_size") and self.image_size != side:
                raise ValueError(f"--image-size {self.image_size}: {self.model} takes only {side} px inputs")
        if self.pretrained is not None:
            from model.pretrained import check_source

            check_source(self.model, self.pretrained)
        if not 0.0 < self.backbone_lr_scale <= 1.0 or not math.isfinite(self.backbone_lr_scale):
            raise ValueError(f"--backbone-lr-scale {self.backbone_lr_scale}: must be in (0, 1]")

    def norm(self) -> Norm:
        """The input normalisation ``(mean, std)``: the pretrained weights' (timm's config of the architecture,
        0.5/0.5 for efficientnet-lite), else the pipeline's default (DeepfakeNet)."""
        from model.pretrained import norm_for

        norm = norm_for(self.model, self.pretrained)
        return DEFAULT_NORM if norm is None else check_norm(norm, f"--model {self.model}: its mean/std")

    def model_kwargs(self) -> Dict[str, Any]:
        """Overrides of the model variant's defaults (saved in the checkpoint, so it loads back the same)."""
        return {"input_filter": self.input_filter} if self.input_filter else {}

    def aug_config(self) -> AugConfig:
        """The training augmentation: the ``aug`` preset, with ``preprocess`` and ``self_blend`` applied."""
        extra = {"preprocess": self.preprocess} if self.preprocess else {}
        return AugConfig.preset(self.aug, self_blend=self.self_blend, sbi_mask=self.sbi_mask, **extra)

    @property
    def sources(self) -> Tuple[str, ...]:
        """The pack outputs trained on: ``(data,)``, or the several."""
        return self.data if isinstance(self.data, tuple) else (self.data,)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names}
        if isinstance(values.get("data"), list):  # --data, repeatable, each maybe A:0.7,B:0.3
            values["data"], values["data_weights"] = parse_data(values["data"])
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        """The settings as config.json and the checkpoints record them: ``storage_options`` by key names only
        and URLs without a password (credential values are never written anywhere)."""
        d = dataclasses.asdict(self)
        d["storage_options"] = option_names(self.storage_options)
        d["data"], d["val_data"] = redacted(self.data), redacted(self.val_data)
        return d
