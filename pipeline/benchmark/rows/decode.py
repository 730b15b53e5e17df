"""The read and decode-only rows: raw tar reading and the JPEG decode limit of the bench's processes."""
from __future__ import annotations

import collections
import itertools
import multiprocessing as mp
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import torch

from pipeline.benchmark.harness import Stream, TreeMonitor
from pipeline.benchmark.rows.common import finish, iter_tar_samples, list_images, load_shard_images, shard_paths
from shard_tools.format import IMAGE_EXTS


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


# Set in each decode worker process by the pool initializer; read by _decode_batch.
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


def pool_stream(params: dict, init: Callable, initargs: tuple, fn: Callable, args: Callable[[int], tuple]) -> Stream:
    """Batches of ``fn(*args(start))`` in --workers pool processes (each set up by ``init(*initargs)``),
    keeping 2 batches per worker in flight; ``fn`` returns the images it did. No data comes back:
    the row measures the work, not a hand-off."""
    workers = max(1, params["workers"])
    batch = params["batch_size"]
    pool = mp.get_context().Pool(workers, initializer=init, initargs=initargs)

    def gen() -> Iterator[Tuple[int, int]]:
        pending: collections.deque = collections.deque()
        start = 0
        while True:
            while len(pending) < 2 * workers:
                pending.append(pool.apply_async(fn, args(start)))
                start += batch
            yield pending.popleft().get(), 0

    def close() -> None:
        pool.terminate()
        pool.join()

    return Stream(gen(), close=close, processes=workers)


def decode_stream(items: list, params: dict, *, from_files: bool) -> Stream:
    """Decode batches of ``items`` in --workers processes, keeping 2 batches per worker in flight."""
    batch = params["batch_size"]
    return pool_stream(params, _decode_init, (items, from_files), _decode_batch,
                       lambda start: (start, batch, from_files))


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


def row_decode_gpu(params: dict, monitor: TreeMonitor) -> List[dict]:
    """nvJPEG decode-only: the same encoded images, one ``decode_jpeg(list, device="cuda")`` per batch."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    from pipeline.benchmark.rows.common import cuda_check

    cuda_check("cuda")
    images = load_shard_images(shard_paths(params), params["decode_samples"])
    blobs = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for _, data in images]
    jpegs = [b for b in blobs if b[:2].tolist() == [0xFF, 0xD8]]
    if not jpegs:
        from pipeline.benchmark.harness import SkipRow

        raise SkipRow("no JPEG samples among the decode-only row's images")
    batch = params["batch_size"]
    device = torch.device("cuda")
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision 0.29 points to TorchCodec

    def gen() -> Iterator[Tuple[int, int]]:
        for start in itertools.count(0, batch):
            chunk = [jpegs[i % len(jpegs)] for i in range(start, start + batch)]
            decode_jpeg(chunk, mode=ImageReadMode.RGB, device=device)
            yield batch, 0

    monitor.reset_peak()
    return finish(params, monitor, Stream(gen(), sync=lambda: torch.cuda.synchronize(device)),
                  note=f"torchvision.io.decode_jpeg(list, device='cuda') (nvJPEG) of {len(jpegs)} JPEGs of the "
                       f"decode-only row, {batch} per call, in the main process, no resize",
                  memory=f"bounded: at most --decode-samples={params['decode_samples']} encoded images")
