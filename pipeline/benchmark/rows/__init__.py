"""The benchmark's rows: one table from a row kind to the function that measures it.

Each row function takes ``(params: dict, monitor: TreeMonitor)`` and returns a list of result rows;
`pipeline.benchmark.runner` runs each in a fresh process. Modules are imported only when their row
runs (a DALI-less or model-less row never imports those libraries).
"""
from __future__ import annotations

import importlib
from typing import Callable

# kind -> (module under pipeline.benchmark.rows, function)
ROWS = {
    "read": ("decode", "row_read"),
    "decode": ("decode", "row_decode"),
    "decode_files": ("decode", "row_decode_files"),
    "decode_gpu": ("decode", "row_decode_gpu"),
    "limit_eval": ("limits", "row_limit_eval"),
    "limit_train": ("limits", "row_limit_train"),
    "original": ("baselines", "row_original"),
    "wds": ("baselines", "row_wds"),
    "loader": ("loaders", "row_loader"),
    "epochs": ("loaders", "row_epochs"),
    "self_blend": ("self_blend", "row_self_blend"),
    "stall": ("model", "row_stall"),
    "pack": ("pack", "row_pack"),
    "remote": ("remote", "row_remote"),
    "faces": ("faces", "row_faces"),
}


def get_row_fn(kind: str) -> Callable:
    """The function that measures row ``kind``; KeyError for an unknown kind."""
    module, name = ROWS[kind]
    return getattr(importlib.import_module(f"pipeline.benchmark.rows.{module}"), name)
