"""The work-limit rows: the least work a CPU loader must do per image, without a loader around it.

A loader row's ratio to the decode-only limit mixes two things: work the loader cannot avoid
(the resize, the augmentation, the float output) and its own overhead (process hand-off,
collation, main-process work competing with the workers for the cores). These rows measure the
first alone, with the project's own ops (`pipeline.augment.uint8_ops`, OpenCV), on the images of
the decode-only row, in as many pool processes as the loader has workers, one thread each, and
nothing sent back but a count; a loader row divided by its work limit is then the share of the
cores it turns into finished batches.

* eval: decode (`uint8_ops.decode`) -> antialiased resize to ``image_size`` of the batch
  (`uint8_ops.process_into` without parameters, i.e. `resize_into`) -> normalised float32
  (`uint8_ops.normalize_hwc`, into a recycled buffer).
* train: the same, with the ``seed`` augmentation's parameters drawn per batch
  (`pipeline.augment.params.draw_params`) given to `process_into`: every sample is resized, and
  the samples the preset selects (``apply_prob`` 0.5) get one OpenCV warp (flips, rotation, shear
  composed) and the brightness factor.
"""
from __future__ import annotations

from typing import List

import numpy as np
import torch

from pipeline.benchmark.harness import TreeMonitor
from pipeline.benchmark.rows.common import finish, load_shard_images, shard_paths
from pipeline.benchmark.rows.decode import pool_stream

# Set in each pool process by `_work_init`; read by `_work_batch`.
_STATE: dict = {}


def _work_init(blobs: List[bytes], image_size: int, batch: int, train: bool, seed: int) -> None:
    from pipeline.augment import uint8_ops
    from pipeline.augment.config import AugConfig

    torch.set_num_threads(1)
    uint8_ops.single_threaded()
    _STATE.clear()
    _STATE.update(
        blobs=[np.frombuffer(data, dtype=np.uint8) for data in blobs],
        out=np.empty((batch, image_size, image_size, 3), dtype=np.uint8),
        pool=uint8_ops.BufferPool(capacity=1), aug=AugConfig.preset("seed") if train else None, seed=seed,
    )


def _work_batch(start: int, size: int) -> int:
    from pipeline.augment import uint8_ops
    from pipeline.augment.params import draw_params
    from pipeline.data.contract import derive_seed

    blobs, out, aug = _STATE["blobs"], _STATE["out"][:size], _STATE["aug"]
    decoded = [uint8_ops.decode(blobs[i % len(blobs)]) for i in range(start, start + size)]
    params = None
    if aug is not None:
        generator = torch.Generator().manual_seed(derive_seed(_STATE["seed"], start, "work-limit"))
        params = draw_params(size, aug, generator)
    uint8_ops.process_into(decoded, out, params)
    uint8_ops.normalize_hwc(torch.from_numpy(out), _STATE["pool"])  # the float output, then dropped
    return size


def _row(params: dict, monitor: TreeMonitor, train: bool) -> List[dict]:
    images = load_shard_images(shard_paths(params), params["decode_samples"])
    blobs = [data for _, data in images]
    batch, size, workers = params["batch_size"], params["image_size"], max(1, params["workers"])
    monitor.reset_peak()
    stream = pool_stream(params, _work_init, (blobs, size, batch, train, params["seed"]), _work_batch,
                         lambda start: (start, batch))
    work = ("decode + resize + seed-aug warp and brightness (on the samples it selects) + normalised float"
            if train else "decode + antialiased resize + normalised float")
    return finish(params, monitor, stream, train=train,
                  note=f"{work} to {size} px with uint8_ops (OpenCV), {len(blobs)} images of the decode-only row, "
                       f"{workers} processes, no loader and no hand-off",
                  memory=f"bounded: at most --decode-samples={params['decode_samples']} encoded images per process")


def row_limit_eval(params: dict, monitor: TreeMonitor) -> List[dict]:
    return _row(params, monitor, train=False)


def row_limit_train(params: dict, monitor: TreeMonitor) -> List[dict]:
    return _row(params, monitor, train=True)

