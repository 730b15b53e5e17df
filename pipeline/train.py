"""deepfake-train: train DeepfakeNet on packed shards with accelerate, one or many processes, resumable.

    accelerate launch [--multi_gpu --num_processes N] [--mixed_precision bf16] pipeline/train.py \
        --data PACK_OUT --out RUN_DIR [--model deepfakenet_base] [--image-size 224] ...
    python pipeline/train.py --cpu --data PACK_OUT --out RUN_DIR ...       # one process

Each process builds its own loader for its part of the data (``pipeline.data.loader.build_loader`` with
``rank``/``world_size`` from accelerate; the loader is never given to ``accelerator.prepare``);
model, optimizer and scheduler are prepared. Validation runs every epoch on every rank's part;
ids, scores and labels are gathered once and padded repeats dropped, so each val sample counts once.

RUN_DIR (written on the main process, every file atomically): config.json, metrics.csv,
tb/ (TensorBoard), curves.png, best.safetensors, last.safetensors, state/ (accelerate state of the
last finished epoch, for --resume), summary.json (at the end), ranks/rank-N.json (per-rank check).
Exit codes: 0 ok, 2 bad flag / data / run-dir error (one line).

Resume: the accelerate state (model, optimizer, scheduler, RNG) and the epoch history are saved
after every epoch into state/epoch_NNNN (written under a temp name, then renamed); --resume loads the
newest and continues with the next epoch; loaders are re-seeded per epoch (``set_epoch``), so a
resumed run sees the same data as an uninterrupted one.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: repo root on sys.path, this file's folder off it (else shard_tools/
    _here = os.path.dirname(os.path.abspath(__file__))  # inspect.py would shadow the stdlib's inspect, and so on)
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import logging
from typing import List, Optional

from model import INPUT_FILTERS, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, list_models
from pipeline.augment.config import SBI_MASKS, PREPROCESS, PRESETS
from pipeline.data.contract import BACKEND_CHOICES, DECODE_CHOICES
from pipeline.scoring.cli import OneLineParser
from pipeline.scoring.outputs import shown
from pipeline.training.config import FAKES, LOSSES, OPTIMIZERS, PRECISIONS, RECIPES, SCHEDULES, TrainConfig

logger = logging.getLogger(__name__)


def _add_data_args(p: argparse.ArgumentParser, d) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, action="append", metavar="PACK[:WEIGHT]",
                   help="a deepfake-pack output (with manifest.json: train and val splits): a local folder or a URL "
                        "(s3://bucket/prefix, https://host/prefix, gs://..., file://...; streamed through fsspec), or a "
                        "local shard pattern of the train split (/data/train-{000000..000009}.tar, then --val-data too). "
                        "Several sources: repeat it (--data A --data B) or list them with sampling weights "
                        "(--data A:0.7,B:0.3): an epoch has as many samples as all their train splits together, shared "
                        "by weight (without weights: each sample once); validation reports each source's val split "
                        "(val_roc_auc/NAME) and all together (torch backend)"),
    g.add_argument("--val-data", default=None,
                   help="where the validation split is, when not the 'val' split of --data (needed when --data is a pattern)")
    g.add_argument("--storage-options", default=None, metavar="JSON",
                   help='fsspec options for URLs, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\' (credentials come the '
                        "usual way: environment, ~/.aws); also connect_timeout/read_timeout (s) and attempts")
    g.add_argument("--cache-dir", default=None,
                   help="local folder for remote shards: downloaded once, verified against the manifest, read from disk "
                        "from then on (torch backend: without it shards are streamed every epoch; DALI always downloads, "
                        "by default to ~/.cache/deepfake-pipeline)")
    g.add_argument("--verify-data", action="store_true",
                   help="hash every shard against its manifest SHA-256 before training (reads the data once more); "
                        "without it each sample's bytes, label and count are still checked as they are read")
    g.add_argument("--backend", default=d["backend"].default, choices=BACKEND_CHOICES,
                   help="loader backend: dali (nvJPEG + GPU ops; CPU pipeline without CUDA), torch (shard stream + "
                        "DataLoader workers; augments on the GPU, or in the workers on a CPU), or auto (default: dali "
                        "on CUDA when DALI is installed, else torch, the faster one on a CPU)")
    g.add_argument("--decode", default=d["decode"].default, choices=DECODE_CHOICES,
                   help="torch backend: decode the JPEGs in the workers (cpu) or with nvJPEG on the GPU (gpu: workers only "
                        "read and batch the bytes); auto = gpu on CUDA, cpu otherwise")
    g.add_argument("--workers", type=int, default=d["workers"].default, help="loader worker processes per rank (torch backend) / DALI threads")
    g.add_argument("--image-size", type=int, default=d["image_size"].default, help=f"square input side in px ({MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE})")


def _add_aug_args(p: argparse.ArgumentParser, d) -> None:
    g = p.add_argument_group("augmentation")
    g.add_argument("--aug", default=d["aug"].default, choices=PRESETS,
                   help="training augmentation preset (pipeline.augment.config.AugConfig): none; seed (the original's: "
                        "flips, rotation, shear, brightness on half the samples); robust (seed + blur and JPEG, p=0.5); "
                        "artifact (native crops, flips, random down-scaling of both classes, blur/JPEG at p=0.1)")
    g.add_argument("--preprocess", default=None, choices=PREPROCESS,
                   help="how images reach --image-size: resize (the whole image, antialiased) or crop (native "
                        "resolution: random crops at even offsets in training, the centre crop in validation; images "
                        "smaller than the crop are padded by reflection, never up-sampled); default: the preset's "
                        "(crop for artifact, resize otherwise). Saved in the checkpoint for evaluate/predict")
    g.add_argument("--self-blend", type=float, default=d["self_blend"].default, metavar="P",
                   help="probability that a real training sample is replaced by a self-blended pseudo-fake of itself "
                        "(Shiohara & Yamasaki 2022) and labelled fake; fakes are never blended; validation always "
                        "scores the split's true fakes (torch backend)")
    g.add_argument("--sbi-mask", choices=SBI_MASKS, default=d["sbi_mask"].default,
                   help="self-blending mask: face = placed and sized on the face stage's detector box where the sample "
                        "has one (packs made with --faces), else the default ellipse; ellipse = always the ellipse")
    g.add_argument("--fakes", default=d["fakes"].default, choices=FAKES,
                   help="all: train on the split's fakes too; sbi-only: leave them out and learn from reals and "
                        "their pseudo-fakes alone (needs --self-blend)")
    g = p.add_argument_group("explanations")
    g.add_argument("--explain-val", type=int, default=d["explain_val"].default, metavar="K",
                   help="after each epoch, put a grid of K fixed val images (the first by id, half of each class) with "
                        "their Grad-CAM heat maps into TensorBoard (tag explain/val; main process; 0: off). Needs "
                        "local val shards")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    d = TrainConfig.__dataclass_fields__
    p = OneLineParser(
        prog="deepfake-train", add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a DeepfakeNet real/fake detector on deepfake-pack shards (single process, or many "
                    "under `accelerate launch`). Defaults: AdamW, lr 1e-3 for a global batch of 64, cosine "
                    "schedule with 1 warm-up epoch, BCE loss, the `seed` augmentation.",
        epilog="Multi-process on CPU: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 "
               "--num_machines 1 --mixed_precision no --dynamo_backend no pipeline/train.py ... "
               "(`accelerate launch --cpu` alone starts one process).",
    )
    _add_data_args(p, d)
    _add_aug_args(p, d)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d["model"].default,
                   help=f"model (model.create_model): {', '.join(list_models())}, or timm/NAME for any timm architecture "
                        "(e.g. timm/tf_efficientnet_lite0, timm/resnet18; built with a one-logit head)")
    g.add_argument("--pretrained", default=d["pretrained"].default, metavar="SOURCE",
                   help="initial weights of the backbone: a local .safetensors or torch file (read weights-only, matched "
                        "by name), efficientnet-lite0/1/2 (ImageNet weights from the pip packages of the [pretrained] "
                        "extra, for timm/tf_efficientnet_lite0/1/2), or timm (timm's hub: downloads). The classifier "
                        "head is always new. The input normalisation follows the weights (and is saved in the checkpoint)")
    g.add_argument("--backbone-lr-scale", type=float, default=d["backbone_lr_scale"].default,
                   help="with --pretrained: the backbone's learning rate is --lr times this (the new head gets --lr)")
    g.add_argument("--freeze-bn", action="store_true",
                   help="keep every BatchNorm layer in eval mode with its statistics and affine parameters fixed "
                        "(usual when fine-tuning a pretrained backbone with small per-process batches)")
    g.add_argument("--input-filter", default=None, choices=INPUT_FILTERS,
                   help="none: the image as it is; npr: the NPR residual x - up(down(x)) (Tan et al. 2024), applied "
                        "inside the model (so evaluate, predict and ONNX get it too); default: the variant's own "
                        "(npr for deepfakenet_npr*)")
    g = p.add_argument_group("optim")
    g.add_argument("--epochs", type=int, default=d["epochs"].default, help="training epochs")
    g.add_argument("--batch-size", type=int, default=d["batch_size"].default, help="batch size per process")
    g.add_argument("--lr", type=float, default=d["lr"].default,
                   help="peak learning rate (the default suits a global batch of 64 with AdamW; scale it with the global batch)")
    g.add_argument("--optimizer", default=d["optimizer"].default, choices=OPTIMIZERS, help="optimizer (no weight decay on BN and biases)")
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"].default, help="weight decay of conv/linear weights")
    g.add_argument("--schedule", default=d["schedule"].default, choices=SCHEDULES, help="LR schedule after the warm-up")
    g.add_argument("--warmup-epochs", type=float, default=d["warmup_epochs"].default, help="linear LR warm-up, in epochs (may be fractional)")
    g.add_argument("--min-lr-ratio", type=float, default=d["min_lr_ratio"].default, help="cosine schedule ends at lr x this")
    g.add_argument("--clip-grad", type=float, default=d["clip_grad"].default, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--loss", default=d["loss"].default, choices=LOSSES,
                   help="bce: BCE with logits; mse: squared error of sigmoid(logit) vs the 0/1 label (the original's)")
    g.add_argument("--grad-accum", type=int, default=d["grad_accum"].default,
                   help="gradient accumulation steps (steps per epoch are rounded down to a multiple)")
    g.add_argument("--recipe", default=None, choices=tuple(RECIPES),
                   help="preset of defaults; 'seed' = the original project (Adam 1e-5, MSE, batch 32, 224 px, seed aug, "
                        "constant LR); flags given explicitly still win")
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="run directory (config.json, metrics.csv, checkpoints, state/, summary.json)")
    g.add_argument("--seed", type=int, default=d["seed"].default, help="seed of model init, data order and augmentation")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch "
                   "(settings must match its config.json); starts it if it has no saved state")
    g.add_argument("--max-steps", type=int, default=d["max_steps"].default,
                   help="stop each epoch after this many batches per process (smoke runs; 0 = full epochs)")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available (Accelerator(cpu=True))")
    g.add_argument("--mixed-precision", default=None, choices=PRECISIONS,
                   help="override accelerate's mixed precision (default: what `accelerate launch --mixed_precision` set, else no)")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse twice when --recipe is given: the recipe sets defaults, explicit flags still win."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.recipe:
        parser.set_defaults(**RECIPES[args.recipe])
        args = parser.parse_args(argv)
    return args


def main(argv: Optional[List[str]] = None, *, on_step=None) -> int:
    """Run deepfake-train; ``on_step(epoch, step)`` is called after every training step (tests)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = TrainConfig.from_args(args)
    except ValueError as e:
        logger.error("error: %s", shown(e))
        return 2
    from pipeline.training.loop import run

    return run(cfg, on_step=on_step)


if __name__ == "__main__":
    sys.exit(main())
