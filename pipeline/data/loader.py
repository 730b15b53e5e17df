"""`build_loader`: the one entry point from shards to device batches, for train, evaluate and bench.

Two interchangeable backends with the same contract (`pipeline.data.contract`):

* ``dali``  - `pipeline.data.dali_backend`: DALI webdataset reader, nvJPEG decode and GPU ops on
  CUDA, the CPU pipeline (``device_id=None``) without it.
* ``torch`` - `pipeline.data.torch_backend`: shard stream, uint8 decode + resize in DataLoader
  workers; per-sample augmentation on the batch on the GPU (`pipeline.augment.batch_ops`), or, on a
  CPU, in the workers in uint8 (`pipeline.augment.uint8_ops`). The faster backend on CPU.

A new backend: a class taking ``(spec, shardset)`` (a list of shardsets for several ``spec.sources``)
that keeps the contract, and one line in
`BACKEND_CLASSES` (and its name in `pipeline.data.contract.BACKENDS`).
"""
from __future__ import annotations

import importlib

from pipeline.data.contract import LoaderSpec
from pipeline.data.shards import resolve_shards

# backend name -> (module, class); imported only when chosen (DALI is optional at run time)
BACKEND_CLASSES = {
    "torch": ("pipeline.data.torch_backend", "TorchLoader"),
    "dali": ("pipeline.data.dali_backend", "DaliLoader"),
}


def build_loader(spec: LoaderSpec):
    """The loader for ``spec`` (see `pipeline.data.contract` for what it yields).

    Raises ValueError for bad settings (naming the flag) and `pipeline.data.shards.DataError` for
    bad data (naming the file).
    """
    module, name = BACKEND_CLASSES[spec.backend]
    cls = getattr(importlib.import_module(module), name)  # DALI itself is imported only when the graph is built
    shardsets = [resolve_shards(data, spec.split, need_index=spec.backend == "dali",
                                storage_options=spec.storage_options) for data in spec.sources]
    return cls(spec, shardsets[0] if len(shardsets) == 1 else shardsets)
