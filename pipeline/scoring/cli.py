"""What the scoring entry points (evaluate, predict) share: their common flag checks and default device."""
from __future__ import annotations

import argparse

import torch


def check_inference_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The flags evaluate and predict share: --batch-size, --workers, --threshold, --device."""
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: must be >= 1")
    if args.workers < 0:
        p.error(f"--workers {args.workers}: must be >= 0")
    if not 0.0 <= args.threshold <= 1.0:
        p.error(f"--threshold {args.threshold}: must be in [0, 1]")
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
