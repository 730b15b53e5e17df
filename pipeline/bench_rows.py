"""The rows of `pipeline.bench`: each builds an endless batch stream, runs in its own process.

Every row function takes the row's params (a dict of the CLI's settings) and the process tree
monitor, and returns a list of row dicts (usually one). Rows that cannot run raise `SkipRow`.
The training-step and packer rows live in `pipeline.bench_model`.
"""
from __future__ import annotations

import collections
import itertools
import multiprocessing as mp
import tarfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import psutil
import torch

from pipeline.augment import MEAN, STD
from pipeline.bench_harness import SkipRow, Stream, TreeMonitor, measure_stream

IMAGE_EXTS = ("jpg", "png", "webp")
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
    from pipeline.data import resolve_shards

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


def epochs(loader, set_epoch: bool = False) -> Iterator[Tuple[int, int]]:
    """Loop a finite loader forever, yielding ``(batch size, 0)``."""
    for epoch in itertools.count():
        if set_epoch:
            loader.set_epoch(epoch)
        n = 0
        for batch in loader:
            n += 1
            images = batch.images if hasattr(batch, "images") else batch[0]
            yield int(images.shape[0]), 0
        if n == 0:
            raise RuntimeError("the loader yielded no batch in a whole epoch (fewer samples than --batch-size?)")


# ---------------------------------------------------------------- 1. read only
def row_read(params: dict, monitor: TreeMonitor) -> List[dict]:
    shards = shard_paths(params)
    batch = params["batch_size"]

    def gen() -> Iterator[Tuple[int, int]]:
        n = nbytes = 0
        for shard in itertools.cycle(shards):
            for ext, _, size in iter_tar_samples(shard):
                nbytes += size
                if ext in IMAGE_EXTS:
                    n += 1
                    if n == batch:
                        yield n, nbytes
                        n = nbytes = 0

    return finish(params, monitor, Stream(gen()),
                  note="tarfile streaming of the shard files in one process (page cache once warm)",
                  memory="constant: one tar member at a time")


# ---------------------------------------------------------------- 2. decode-only limit
_BLOBS: List[torch.Tensor] = []


def _decode_init(blobs: List[Tuple[str, bytes]], paths: bool) -> None:
    torch.set_num_threads(1)
    _BLOBS.clear()
    if paths:  # decode-from-files variant: keep the paths, read each time (as the packer must)
        _BLOBS.extend(blobs)
    else:
        _BLOBS.extend(torch.frombuffer(bytearray(data), dtype=torch.uint8) for _, data in blobs)


def _decode_batch(start: int, size: int, from_files: bool) -> int:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    n = len(_BLOBS)
    for i in range(start, start + size):
        item = _BLOBS[i % n]
        if from_files:
            path = item[0]
            item = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
            is_jpeg = path.lower().endswith((".jpg", ".jpeg"))
        else:
            is_jpeg = item[:2].tolist() == [0xFF, 0xD8]
        if is_jpeg:
            decode_jpeg(item, mode=ImageReadMode.RGB)
        else:
            decode_image(item, mode=ImageReadMode.RGB)
    return size


def decode_stream(items: list, params: dict, *, from_files: bool) -> Stream:
    """Decode batches of ``items`` in --workers processes, keeping 2 batches per worker in flight."""
    workers = max(1, params["workers"])
    batch = params["batch_size"]
    pool = mp.get_context().Pool(workers, initializer=_decode_init, initargs=(items, from_files))

    def gen() -> Iterator[Tuple[int, int]]:
        pending: collections.deque = collections.deque()
        start = 0
        while True:
            while len(pending) < 2 * workers:
                pending.append(pool.apply_async(_decode_batch, (start, batch, from_files)))
                start += batch
            yield pending.popleft().get(), 0

    def close() -> None:
        pool.terminate()
        pool.join()

    return Stream(gen(), close=close, processes=workers)


def row_decode(params: dict, monitor: TreeMonitor) -> List[dict]:
    images = load_shard_images(shard_paths(params), params["decode_samples"])
    monitor.reset_peak()
    return finish(params, monitor, decode_stream(images, params, from_files=False),
                  note=f"torchvision.io.decode_jpeg (libjpeg-turbo) of {len(images)} encoded images from the "
                       f"shards, cycled, in {max(1, params['workers'])} processes, no resize",
                  memory=f"bounded: at most --decode-samples={params['decode_samples']} encoded images per process")


def row_decode_files(params: dict, monitor: TreeMonitor) -> List[dict]:
    items = list_images(params)
    return finish(params, monitor, decode_stream(items, params, from_files=True),
                  note=f"read + decode_jpeg of the {len(items)} folder files (what the packer must do), "
                       f"{max(1, params['workers'])} processes",
                  memory="grows with the number of files: the path list (~100 B per file)")


# ---------------------------------------------------------------- 3. original-project baseline
class OriginalDataset(torch.utils.data.Dataset):
    """The original project's per-item path (see docs ORIGINAL.md), with correct labels.

    cv2.imread -> BGR->RGB -> cv2.resize -> swapaxes(0, 2) -> float tensor 0..255 -> for odd items the
    v2.Compose of flips, RandomAffine, ColorJitter and Resize. PIL stands in when cv2 is missing.
    """

    def __init__(self, items: List[Tuple[str, int]], size: int) -> None:
        from torchvision.transforms import v2

        self.items, self.size = items, size
        self.aug = v2.Compose([
            v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5),
            v2.RandomAffine(degrees=(-30, 30), shear=(0.75, 1.25, 0.75, 1.25)),
            v2.ColorJitter(brightness=(0.75, 1.25)), v2.Resize((size, size)),
        ])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        import numpy as np

        path, label = self.items[i]
        try:
            import cv2

            img = cv2.imread(path)
            if img is None:
                raise ValueError(f"{path}: cv2.imread could not read the file")
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
            img = cv2.resize(img, (self.size, self.size))
        except ImportError:
            from PIL import Image

            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB").resize((self.size, self.size), Image.BILINEAR))
        x = torch.Tensor(np.swapaxes(img, 0, 2))
        if i % 2:
            x = self.aug(x)
        return x, torch.tensor(float(label))


def row_original(params: dict, monitor: TreeMonitor) -> List[dict]:
    items = list_images(params)
    try:
        import cv2  # noqa: F401

        how = "cv2 (opencv-python-headless)"
    except ImportError:
        how = "PIL (cv2 not installed: install opencv-python-headless for the faithful path)"
    workers = params["workers"]
    loader = torch.utils.data.DataLoader(
        OriginalDataset(items, params["image_size"]), batch_size=params["batch_size"], shuffle=True,
        num_workers=workers, persistent_workers=workers > 0, drop_last=True,
        generator=torch.Generator().manual_seed(params["seed"]),
    )
    return finish(params, monitor, Stream(epochs(loader), processes=max(1, workers)),
                  note=f"{how} per file, float v2 transforms on half the items, DataLoader {workers} workers",
                  memory="grows with the number of files: the path list in every worker")


# ---------------------------------------------------------------- 4. naive webdataset
def row_wds(params: dict, monitor: TreeMonitor) -> List[dict]:
    import webdataset as wds
    from torchvision.transforms import v2

    shards = shard_paths(params)
    size = params["image_size"]
    tf = v2.Compose([
        v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
        v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5),
        v2.RandomAffine(degrees=(-30, 30), shear=(0.75, 1.25, 0.75, 1.25)),
        v2.ColorJitter(brightness=(0.75, 1.25)), v2.Resize((size, size)), v2.Normalize(MEAN, STD),
    ])
    # resampled: every worker draws shards with replacement, so no worker sits idle on few shards
    ds = (wds.WebDataset(shards, resampled=True, shardshuffle=False, nodesplitter=None, seed=params["seed"])
          .shuffle(256).decode("pil").to_tuple("jpg;png;webp", "cls").map_tuple(tf, int))
    workers = params["workers"]
    loader = torch.utils.data.DataLoader(ds, batch_size=params["batch_size"], num_workers=workers,
                                         persistent_workers=workers > 0)
    return finish(params, monitor, Stream(epochs(loader), processes=max(1, workers)),
                  note=f"webdataset + PIL decode + per-sample float v2 transforms, DataLoader {workers} workers",
                  memory="constant: shuffle buffer of 256 decoded samples per worker")


# ---------------------------------------------------------------- 5. build_loader backends
def cuda_check(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SkipRow("--device cuda but CUDA is not available here")


def open_loader(params: dict, backend: str, *, train: bool, aug: str):
    """`build_loader`, with a missing backend module/library turned into a skip reason."""
    cuda_check(params["device"])
    try:
        from pipeline.loaders import build_loader

        return build_loader(params["data"], params["split"], backend=backend, device=params["device"],
                            batch_size=params["batch_size"], image_size=params["image_size"], train=train,
                            aug=aug, seed=params["seed"], num_workers=params["workers"])
    except ImportError as e:
        raise SkipRow(f"backend {backend!r} not available: {e}") from e


def row_loader(params: dict, monitor: TreeMonitor) -> List[dict]:
    backend, train = params["backend"], params["train"]
    aug = "seed" if train else "none"
    loader = open_loader(params, backend, train=train, aug=aug)
    device = torch.device(params["device"])
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    close = getattr(loader, "close", lambda: None)
    return finish(params, monitor, Stream(epochs(loader, set_epoch=True), sync=sync, close=close,
                                          processes=max(1, params["workers"])),
                  note=f"build_loader(backend={backend}, train={train}, aug={aug}) on {device}, "
                       f"{params['workers']} workers",
                  memory="constant in dataset size: shard list + shuffle buffer")


# ---------------------------------------------------------------- 5b. memory over epochs
def row_epochs(params: dict, monitor: TreeMonitor) -> List[dict]:
    """Three whole training epochs of one backend; the tree's memory at the end of each.

    What a long run needs to know: does resident memory stay flat epoch after epoch (no cache,
    queue or per-sample state that grows with the number of samples seen)?
    """
    backend = params["backend"]
    loader = open_loader(params, backend, train=True, aug="seed")
    device = torch.device(params["device"])
    per_epoch_pss, per_epoch_rss, n, t0, cpu0 = [], [], 0, time.perf_counter(), monitor.poll()
    try:
        for epoch in range(params["memory_epochs"]):
            loader.set_epoch(epoch)
            for batch in loader:
                n += int(batch.images.shape[0])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            mem = monitor.memory()
            per_epoch_pss.append(_tree_mb(monitor, "pss"))
            per_epoch_rss.append(_tree_mb(monitor, "rss"))
    finally:
        getattr(loader, "close", lambda: None)()
    dt = time.perf_counter() - t0
    cpu = 100.0 * (monitor.poll() - cpu0) / dt
    growth = round(per_epoch_pss[-1] - per_epoch_pss[0], 1)
    return [{"status": "ok", "img_s": n / dt, "img_s_repeats": [round(n / dt, 2)], "mb_s": None, "cpu_percent": cpu,
             "timed_images": n, "processes": max(1, params["workers"]), **mem,
             "pss_per_epoch_mb": per_epoch_pss, "rss_per_epoch_mb": per_epoch_rss, "pss_growth_mb": growth,
             "note": f"{params['memory_epochs']} whole train epochs of build_loader(backend={backend}, aug=seed) on "
                     f"{device}; PSS of the process tree at each epoch end: {per_epoch_pss} MB",
             "memory": f"PSS change from the first to the last epoch end: {growth:+.1f} MB"}]


def _tree_mb(monitor: TreeMonitor, kind: str) -> float:
    """Current (not peak) PSS or RSS of the monitored process tree, in MB."""
    total = 0
    for p in [monitor.root] + monitor.root.children(recursive=True):
        try:
            info = p.memory_full_info() if kind == "pss" else p.memory_info()
            total += getattr(info, kind, info.rss)
        except psutil.Error:
            continue
    return round(total / 1e6, 1)


def _model_rows():
    from pipeline import bench_model

    return bench_model.ROW_FUNCS


ROW_FUNCS: Dict[str, object] = {
    "read": row_read, "decode": row_decode, "decode_files": row_decode_files,
    "original": row_original, "wds": row_wds, "loader": row_loader, "epochs": row_epochs,
}


def get_row_fn(kind: str):
    if kind in ROW_FUNCS:
        return ROW_FUNCS[kind]
    return _model_rows()[kind]
