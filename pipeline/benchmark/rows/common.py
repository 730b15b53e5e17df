"""The rows of `pipeline.bench`: each builds an endless batch stream, runs in its own process.

Every row function takes the row's params (a dict of the CLI's settings) and the process tree
monitor, and returns a list of row dicts (usually one). Rows that cannot run raise `SkipRow`.
The training-step and packer rows live in `pipeline.benchmark.rows.model`.
"""
from __future__ import annotations

import itertools
import tarfile
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from pipeline.benchmark.harness import SkipRow, Stream, TreeMonitor, measure_stream
from shard_tools.format import IMAGE_EXTS

FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

MB = 1e6


def finish(params: dict, monitor: TreeMonitor, stream: Stream, **fields) -> List[dict]:
    """Measure ``stream`` with the params' warm-up/batches/repeats; one row dict."""
    try:
        m = measure_stream(stream, monitor, warmup=params["warmup"], batches=params["batches"],
                           repeats=params["repeats"])
        row = {"status": "ok", "processes": stream.processes, **m.summary(), **monitor.memory()}
    finally:
        stream.close()
    row.update(fields)
    return [row]


# ---------------------------------------------------------------- shards and folders
def shard_paths(params: dict) -> List[str]:
    from pipeline.data.shards import resolve_shards

    shards = resolve_shards(params["data"], params["split"]).shards
    local = [s for s in shards if Path(s).exists()]
    if not local:
        raise SkipRow(f"no local shard files for split {params['split']!r} (remote shards are not benchmarked)")
    return local


def iter_tar_samples(path: str) -> Iterator[Tuple[str, bytes, int]]:
    """``(ext, image bytes, tar bytes of the sample)`` for each image member of a tar, streaming."""
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            data = tar.extractfile(member).read()
            ext = member.name.rsplit(".", 1)[-1].lower()
            size = 512 + ((member.size + 511) // 512) * 512  # header + padded body
            yield ext, data, size


def load_shard_images(shards: Sequence[str], limit: int) -> List[Tuple[str, bytes]]:
    """Up to ``limit`` encoded images from the shards, in order (held in memory: bounded)."""
    out: List[Tuple[str, bytes]] = []
    for shard in shards:
        for ext, data, _ in iter_tar_samples(shard):
            if ext in IMAGE_EXTS:
                out.append((ext, data))
                if len(out) >= limit:
                    return out
    if not out:
        raise SkipRow(f"no image samples ({'/'.join(IMAGE_EXTS)}) in {shards[0]} ...")
    return out


def list_images(params: dict) -> List[Tuple[str, int]]:
    """``(path, label)`` of every image file under --images-real (0) and --images-fake (1)."""
    real, fake = params.get("images_real"), params.get("images_fake")
    if not real or not fake:
        raise SkipRow("needs --images-real and --images-fake (the image folders that were packed)")
    items = []
    for folder, label in ((real, 0), (fake, 1)):
        root = Path(folder)
        if not root.is_dir():
            raise SkipRow(f"{root}: not a folder")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in FILE_SUFFIXES and p.is_file())
        items += [(str(p), label) for p in files]
    if not items:
        raise SkipRow(f"no image files ({', '.join(FILE_SUFFIXES)}) under {real} or {fake}")
    return items


def epochs(loader, set_epoch: bool = False, observe: Optional[Callable] = None) -> Iterator[Tuple[int, int]]:
    """Loop a finite loader forever, yielding ``(batch size, 0)``; ``observe(batch)`` sees each batch."""
    for epoch in itertools.count():
        if set_epoch:
            loader.set_epoch(epoch)
        n = 0
        for batch in loader:
            n += 1
            if observe is not None:
                observe(batch)
            images = batch.images if hasattr(batch, "images") else batch[0]
            yield int(images.shape[0]), 0
        if n == 0:
            raise RuntimeError("the loader yielded no batch in a whole epoch (fewer samples than --batch-size?)")


# ---------------------------------------------------------------- 5. build_loader backends
def cuda_check(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SkipRow("--device cuda but CUDA is not available here")


def open_loader(params: dict, backend: str, *, train: bool, aug: str, **aug_fields):
    """`build_loader` with preset ``aug`` (fields overridden by ``aug_fields``), with a missing
    backend module/library turned into a skip reason."""
    cuda_check(params["device"])
    try:
        from pipeline.augment.config import AugConfig
        from pipeline.data.contract import LoaderSpec
        from pipeline.data.loader import build_loader

        config = AugConfig.preset(aug, **aug_fields)
        return build_loader(LoaderSpec(params["data"], params["split"], train=train, backend=backend,
                                       device=params["device"], batch_size=params["batch_size"],
                                       image_size=params["image_size"], aug=config, seed=params["seed"],
                                       num_workers=params["workers"], decode=params.get("decode", "auto")))
    except ImportError as e:
        raise SkipRow(f"backend {backend!r} not available: {e}") from e

