"""Rows of `pipeline.bench` that run a model or the packer: data stall and pack throughput.

Data stall (nanoGPT ``bench.py`` idea): the same training step (forward, backward, optimizer) timed
after a burn-in, once fed by synthetic tensors already on the device and once fed by the best loader;
``stall = 1 - real / synthetic``. On a CPU the loader workers and the model share the cores, so the
stall there also measures that contention.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import time
from typing import Callable, Iterator, List, Tuple

import torch

from pipeline.benchmark.harness import SkipRow, Stream, TreeMonitor, measure_stream
from pipeline.benchmark.rows.common import cuda_check, open_loader

logger = logging.getLogger(__name__)


def _train_step(params: dict) -> Tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.device]:
    from model import create_model

    cuda_check(params["device"])
    device = torch.device(params["device"])
    if device.type == "cpu":
        # OpenMP threads spinning on cores the loader workers use slow a step down many times over
        torch.set_num_threads(params["model_threads"])
    torch.manual_seed(params["seed"])
    model = create_model(params["model"]).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bf16 = params["precision"] == "bf16"

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            logits = model(x).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step, device


def row_stall(params: dict, monitor: TreeMonitor) -> List[dict]:
    backend = params.get("stall_backend")
    if not backend:
        raise SkipRow("no loader row ran in this run (see the loader rows), so there is nothing to feed the model")
    from model import MIN_IMAGE_SIZE

    if params["image_size"] < MIN_IMAGE_SIZE:
        raise SkipRow(f"--image-size {params['image_size']} is below the model's minimum {MIN_IMAGE_SIZE}")
    step, device = _train_step(params)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    b, s = params["batch_size"], params["image_size"]
    timing = dict(warmup=params["stall_warmup"], batches=params["stall_steps"], repeats=params["repeats"])
    common = dict(model=params["model"], precision=params["precision"], device=str(device),
                  threads=torch.get_num_threads())

    # The first batch shows the loader's memory format: the synthetic tensors take the same one
    # (a CPU convolution runs ~1.5x faster on channels-last input, which the torch backend gives).
    loader = open_loader(params, backend, train=True, aug="seed")
    gen = torch.Generator(device="cpu").manual_seed(params["seed"])
    x = torch.randn(b, 3, s, s, generator=gen).to(device)
    y = torch.randint(0, 2, (b,), generator=gen).float().to(device)
    waits: List[float] = []

    def synthetic() -> Iterator[Tuple[int, int]]:
        while True:
            step(x, y)
            yield b, 0

    def real(it: Iterator) -> Iterator[Tuple[int, int]]:
        while True:
            t0 = time.perf_counter()
            batch = next(it)
            waits.append(time.perf_counter() - t0)
            step(batch.images, batch.labels)
            yield int(batch.images.shape[0]), 0

    try:
        batches = _batches(loader)
        first = next(batches)
        channels_last = (not first.images.is_contiguous()
                         and first.images.is_contiguous(memory_format=torch.channels_last))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        synth = measure_stream(Stream(synthetic(), sync=sync), monitor, **timing).summary()
        synth_mem = monitor.memory()
        fed = measure_stream(Stream(real(itertools.chain([first], batches)), sync=sync), monitor,
                             **timing).summary()
    finally:
        getattr(loader, "close", lambda: None)()
    feed = {"backend": backend, "decode": loader.spec.decode}
    return _stall_rows(params, feed, device, channels_last, common, synth, synth_mem, fed, waits,
                       timing["batches"] * timing["repeats"], monitor.memory())


def _stall_rows(params: dict, feed: dict, device, channels_last: bool, common: dict, synth: dict,
                synth_mem: dict, fed: dict, waits: List[float], timed_steps: int, fed_mem: dict) -> List[dict]:
    """The two rows of the stall measurement: synthetic steps, and the same steps fed by the loader."""
    timed_wall = sum(fed["timed_images"] / len(fed["img_s_repeats"]) / v for v in fed["img_s_repeats"])
    wait_pct = 100.0 * sum(waits[-timed_steps:]) / timed_wall if timed_wall > 0 else None
    stall = 100.0 * (1.0 - fed["img_s"] / synth["img_s"])
    decode = f", decode={feed['decode']}" if feed["backend"] == "torch" else ""
    return [
        {"status": "ok", "processes": 1, **synth, **common, **synth_mem,
         "note": f"train steps of {params['model']} ({params['precision']}, {common['threads']} threads) "
                 f"on synthetic {'channels-last ' if channels_last else ''}tensors on {device}",
         "memory": "constant: model, optimizer state, one batch"},
        {"status": "ok", "processes": 1 + params["workers"], **fed, **common, **feed,
         "stall_percent": round(stall, 1), "data_wait_percent": None if wait_pct is None else round(wait_pct, 1),
         **fed_mem,
         "note": f"the same steps fed by build_loader(backend={feed['backend']}, aug=seed{decode}): stall {stall:.1f}% "
                 f"(1 - fed/synthetic), time waiting for data {wait_pct or 0:.1f}%",
         "memory": "constant: model + loader (peak includes the synthetic phase)"},
    ]


def _batches(loader) -> Iterator:
    """Endless batches of a loader, epoch after epoch."""
    for epoch in range(1 << 30):
        loader.set_epoch(epoch)
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError("the loader yielded no batch in a whole epoch (fewer samples than --batch-size?)")

