"""Row 9: the torch train loader with self-blending on, in turns with the same loader without it.

Both loaders (``seed`` augmentation, the same split, seed and workers) are open in this one process;
their timed windows alternate ``--repeats`` times, each from a quiet machine (the other loader's
workers have finished the batches DataLoader asked for, and a window skips, untimed, the batches
that were prefetched before it: `pipeline.benchmark.rows.paired`). Each pair gives one ratio
(with / without); the row reports their median, the ratio a shared machine's drifting speed allows.
With ``--self-blend P`` a real sample becomes a pseudo-fake with probability P and gets the global
transform alone with probability min(P, 1 - P) (`pipeline.augment.self_blend.pseudo_fake_or_real`); the row
counts the pseudo-fakes it saw.
"""
from __future__ import annotations

import statistics
from typing import Callable, List

import torch

from pipeline.benchmark.harness import TreeMonitor
from pipeline.benchmark.rows.common import epochs, open_loader
from pipeline.benchmark.rows.paired import loader_window, wait_idle


def _counter(counts: dict) -> Callable:
    """A batch observer that adds the images and the pseudo-fakes it sees to ``counts``."""
    from pipeline.data.torch_backend import SBI_SUFFIX

    def observe(batch) -> None:
        counts["images"] += int(batch.images.shape[0])
        counts["sbi"] += sum(str(i).endswith(SBI_SUFFIX) for i in batch.ids)
    return observe


def row_self_blend(params: dict, monitor: TreeMonitor) -> List[dict]:
    p, workers, device = params["self_blend"], max(1, params["workers"]), torch.device(params["device"])
    off = open_loader(params, "torch", train=True, aug="seed")
    on = open_loader(params, "torch", train=True, aug="seed", self_blend=p)
    counts = {"off": {"images": 0, "sbi": 0}, "on": {"images": 0, "sbi": 0}}
    streams = {name: epochs(loader, set_epoch=True, observe=_counter(counts[name]))
               for name, loader in (("off", off), ("on", on))}
    rates = {"off": [], "on": []}
    cpus = {"off": [], "on": []}
    try:
        for name, stream in streams.items():  # worker start-up and first shuffle buffers, untimed
            for _ in range(params["warmup"]):
                next(stream)
        for _ in range(params["repeats"]):
            for name, stream in streams.items():
                wait_idle(monitor)
                rate, cpu = loader_window(stream, params["batches"], skip=2 * workers, monitor=monitor)
                rates[name].append(rate)
                cpus[name].append(cpu)
        memory = monitor.memory()
    finally:
        off.close()
        on.close()
    ratios = [a / b for a, b in zip(rates["on"], rates["off"])]
    share = counts["on"]["sbi"] / max(1, counts["on"]["images"])
    base = {"status": "ok", "processes": workers, "mb_s": None, "timed_images": params["batches"] * params["repeats"]
            * params["batch_size"], **memory,
            "memory": "both loaders open in one process: the peak is the pair's"}
    common = (f"build_loader(backend=torch, train=True, aug=seed, decode={off.spec.decode}) on {device}, "
              f"{workers} workers")
    return [
        {**base, "img_s": statistics.median(rates["off"]), "img_s_repeats": [round(v, 2) for v in rates["off"]],
         "cpu_percent": statistics.median(cpus["off"]), "note": f"{common}, in turns with row 9b"},
        {**base, "img_s": statistics.median(rates["on"]), "img_s_repeats": [round(v, 2) for v in rates["on"]],
         "cpu_percent": statistics.median(cpus["on"]), "self_blend": p,
         "vs_no_self_blend": round(statistics.median(ratios), 3), "self_blend_ratios": [round(r, 3) for r in ratios],
         "pseudo_fake_share": round(share, 3),
         "note": f"the same with self_blend={p} ({share:.0%} of the samples seen were pseudo-fakes): "
                 f"x{statistics.median(ratios):.2f} the loader without it (median of {len(ratios)} pairs in turns: "
                 f"{', '.join(f'{r:.3f}' for r in ratios)})"},
    ]
