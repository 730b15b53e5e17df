"""What the entry points share: a parser whose usage errors are one line, the common flags and checks of
evaluate and predict, the default device, UTF-8 on stdout."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import NoReturn

import torch

from pipeline.scoring.outputs import OutputError, shown


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (``PROG: error: ... (see --help)``),
    exit code 2, instead of the usage block and the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {shown(message)} (see --help)\n")


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


def add_scoring_arg(group) -> None:
    """``--scoring``: how an image of any size becomes the model's input (`pipeline.scoring.modes`)."""
    from pipeline.scoring.modes import SCORING

    group.add_argument("--scoring", default=None, choices=SCORING,
                       help="resize: the whole image resized to the model's size; center: the centre crop at native "
                            "resolution; full: the whole image at native resolution; tiles: the mean logit of crops "
                            "covering the image (default: from the checkpoint: resize for resize-trained models, "
                            "full for crop-trained ones)")


def scoring_mode(args: argparse.Namespace, meta: dict) -> str:
    """The ``--scoring`` mode asked for, or the checkpoint's default."""
    from pipeline.scoring.modes import default_scoring

    return args.scoring or default_scoring(meta.get("preprocess", "resize"))


def stdout_bytes(text: str) -> None:
    """Write ``text`` to stdout as UTF-8 whatever the locale says (`pipeline.scoring.outputs.shown` made it
    valid). A reader that went away (``| head``) or a full disk is an OutputError naming stdout; stdout is
    then pointed at /dev/null so that the interpreter's own flush at exit does not fail a second time."""
    buffer = getattr(sys.stdout, "buffer", None)
    try:
        if buffer is None:  # a replaced stdout (tests, notebooks) takes text
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        sys.stdout.flush()
        buffer.write(text.encode("utf-8"))
        buffer.flush()
    except OSError as e:
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        why = "the reader closed the pipe" if isinstance(e, BrokenPipeError) else (e.strerror or str(e)).lower()
        raise OutputError(f"cannot write stdout: {why}; rows were lost: use --out FILE") from None
