"""Export a checkpoint to ONNX and check it against PyTorch with onnxruntime.

    deepfake-export --checkpoint runs/x --onnx model.onnx --dynamic-batch

The graph:

* input ``image``: float32 ``[N, 3, S, S]`` RGB, already normalised as in training
  (``(x / 255 - mean) / std``; resize to ``S`` with bilinear antialias first). ``S`` is the
  checkpoint's image size unless ``--image-size`` says otherwise; ``N`` is fixed to ``--batch-size``
  unless ``--dynamic-batch``.
* outputs ``logit`` ``[N]`` (the raw model output) and ``p_fake`` ``[N]`` (its sigmoid, P(fake)).
* ``metadata_props``: ``model``, ``image_size``, ``mean``, ``std``, ``input``, ``outputs``, ``checkpoint``.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``. The ``torch.export``-based
exporter (the default since torch 2.9) needs the ``onnxscript`` package, which this project does
not require; the TorchScript one needs only ``onnx`` and handles this plain CNN exactly.

Check: a seeded random batch (3 images with ``--dynamic-batch``, to exercise the dynamic axis;
otherwise ``--batch-size``) goes through PyTorch and onnxruntime (CPU); the max abs difference of
``logit`` and ``p_fake`` is logged. Above ``--tolerance`` the exit code is 1 and nothing is written.
The file is written atomically, only after the check passed; an ``--onnx`` that cannot be written
(a folder, an unwritable place) is refused before the checkpoint is read, a checkpoint whose output
is NaN/inf is refused, and a failed write is one line naming the file (exit 2).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: repo root on sys.path, this file's folder off it (else shard_tools/
    _here = os.path.dirname(os.path.abspath(__file__))  # inspect.py would shadow the stdlib's inspect, and so on)
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from pipeline.checkpoint import CheckpointError, load_checkpoint
from pipeline.data.contract import check_image_size
from pipeline.scoring.cli import OneLineParser
from pipeline.scoring.outputs import OutputError, check_output_file, shown, writing
from shard_tools.fsutil import atomic_write_bytes

logger = logging.getLogger("pipeline.export")
INPUT = "image"
OUTPUTS = ("logit", "p_fake")


class ExportHead(nn.Module):
    """The detector with its output flattened to ``[N]`` and the sigmoid appended: ``(logit, p_fake)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        logit = self.model(image).flatten(1)[:, 0]
        return logit, torch.sigmoid(logit)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = OneLineParser(
        description="Export a checkpoint to ONNX (outputs: logit and p_fake) and verify it with onnxruntime.",
        add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint, or a run dir (uses RUN_DIR/best.safetensors)")
    g.add_argument("--image-size", type=int, default=None, help="input side S in pixels (default: the checkpoint's image_size)")
    g = p.add_argument_group("export")
    g.add_argument("--onnx", required=True, help="output .onnx file (written atomically after the check passes)")
    g.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension dynamic (named 'batch')")
    g.add_argument("--batch-size", type=int, default=1, help="the fixed batch size when --dynamic-batch is not given")
    g.add_argument("--opset", type=int, default=17, help="ONNX opset version (the TorchScript exporter supports 7-20)")
    g = p.add_argument_group("check")
    g.add_argument("--tolerance", type=float, default=1e-4, help="max allowed abs difference of logit and p_fake vs PyTorch")
    g.add_argument("--seed", type=int, default=0, help="seed of the random check batch")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.image_size is not None:
        try:
            check_image_size(args.image_size)
        except ValueError as e:
            p.error(str(e))
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: must be >= 1")
    if not 7 <= args.opset <= 20:
        p.error(f"--opset {args.opset}: the TorchScript exporter supports opsets 7 to 20")
    if args.tolerance <= 0:
        p.error(f"--tolerance {args.tolerance}: must be > 0")
    if Path(args.onnx).suffix.lower() != ".onnx":
        p.error(f"--onnx {args.onnx}: the file name must end in .onnx")


def export_onnx(
    model: nn.Module, *, image_size: int, dynamic_batch: bool = False, batch_size: int = 1, opset: int = 17,
    metadata: Optional[Dict[str, str]] = None,
) -> bytes:
    """The serialised, checker-validated ONNX model of ``ExportHead(model)`` (CPU, eval mode)."""
    import onnx

    head = ExportHead(model).to("cpu").eval()
    example = torch.zeros(2 if dynamic_batch else batch_size, 3, image_size, image_size)
    axes = {INPUT: {0: "batch"}, **{o: {0: "batch"} for o in OUTPUTS}} if dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based exporter": chosen on purpose
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the model's input-size check is a constant here
        torch.onnx.export(head, (example,), buf, input_names=[INPUT], output_names=list(OUTPUTS),
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def compare_onnx(onnx_bytes: bytes, model: nn.Module, batch: torch.Tensor) -> Dict[str, float]:
    """Max abs difference per output between onnxruntime (CPU) and PyTorch on ``batch``."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUTS), {INPUT: batch.numpy()})
    with torch.inference_mode():
        want = ExportHead(model).to("cpu").eval()(batch)
    return {name: float(np.abs(g - w.numpy()).max()) for name, g, w in zip(OUTPUTS, got, want)}


def _metadata(meta: dict, size: int) -> Dict[str, str]:
    return {
        "model": meta["model"], "image_size": str(size), "mean": json.dumps(meta["mean"]), "std": json.dumps(meta["std"]),
        "checkpoint": shown(Path(meta["path"]).name),
        "input": f"{INPUT}: float32 [N,3,{size},{size}] RGB, (x/255 - mean)/std",
        "outputs": "logit: [N] raw model output; p_fake: [N] sigmoid(logit) = P(fake)",
    }


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = get_args_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        logger.error("export: %s is not installed: pip install onnx onnxruntime (or the 'export' extra)", e.name)
        return 2
    try:
        check_output_file("--onnx", args.onnx, "file name ending in .onnx")
        model, meta = load_checkpoint(args.checkpoint, device="cpu")
    except (CheckpointError, OutputError) as e:
        logger.error("export: %s", shown(e))
        return 2
    size = args.image_size or int(meta["image_size"])
    if size != int(meta["image_size"]):
        logger.warning("exporting at %d px; the checkpoint was trained at %s px", size, meta["image_size"])
    n = 3 if args.dynamic_batch else args.batch_size
    batch = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
    with torch.inference_mode():
        finite = bool(torch.isfinite(model(batch)).all())
    if not finite:
        logger.error("export: %s: the model's output is NaN or infinite on the check batch: its weights overflow; "
                     "nothing written", shown(meta["path"]))
        return 2
    data = export_onnx(model, image_size=size, dynamic_batch=args.dynamic_batch, batch_size=args.batch_size,
                       opset=args.opset, metadata=_metadata(meta, size))
    diffs = compare_onnx(data, model, batch)
    logger.info("onnxruntime vs PyTorch on a random batch of %d: max abs diff logit %.3g, p_fake %.3g (tolerance %g)",
                n, diffs["logit"], diffs["p_fake"], args.tolerance)
    worst = max(diffs.values())
    if not worst <= args.tolerance:
        logger.error("export: ONNX output differs from PyTorch by %.3g > --tolerance %g; %s not written",
                     worst, args.tolerance, shown(args.onnx))
        return 1
    try:
        with writing(args.onnx):
            atomic_write_bytes(args.onnx, data)
    except OutputError as e:
        logger.error("export: %s", e)
        return 2
    logger.info("wrote %s (%.1f MB, opset %d, input %s [%s,3,%d,%d], outputs %s)", shown(args.onnx), len(data) / 2**20,
                args.opset, INPUT, "batch" if args.dynamic_batch else args.batch_size, size, size, ", ".join(OUTPUTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
