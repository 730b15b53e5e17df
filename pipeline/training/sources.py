"""Several pack outputs in one training run: ``--data A --data B`` or ``--data A:0.7,B:0.3``.

`parse_data` turns the ``--data`` values into sources and weights, `check_sources` refuses what a run
on several sources cannot do (one line naming the flag), `source_names` gives each source the short
name its validation metrics carry (``val_roc_auc/NAME`` in metrics.csv, ``val/roc_auc/NAME`` in
TensorBoard). How the loader mixes them: `pipeline.data.mixture`.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from pipeline.data.shards import is_pattern

_WEIGHTED = re.compile(r"(.+):([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")


def _split_weight(item: str) -> Tuple[str, Optional[float]]:
    """``PATH:WEIGHT`` -> (PATH, WEIGHT); a path that exists as written, or has no numeric suffix, has none."""
    m = _WEIGHTED.fullmatch(item)
    if m is None or os.path.exists(item):
        return item, None
    return m.group(1), float(m.group(2))


def parse_data(values: Sequence[str]) -> Tuple[Union[str, Tuple[str, ...]], Optional[Tuple[float, ...]]]:
    """The sources and weights of the ``--data`` values (the flag may repeat; a value may list
    ``A:0.7,B:0.3``; a value is split at commas only when every part carries a weight, so a path with a
    comma stays whole). One source without weight -> ``(str, None)``. ValueError naming ``--data``."""
    items: List[Tuple[str, Optional[float]]] = []
    for value in values:
        parts = [_split_weight(p) for p in value.split(",")] if "," in value else []
        if parts and all(w is not None for _, w in parts):
            items += parts
        else:
            items.append(_split_weight(value))
    paths = [p for p, _ in items]
    if not paths or any(not p for p in paths):
        raise ValueError(f"--data {','.join(values)!r}: an empty source")
    dup = next((p for i, p in enumerate(paths) if p in paths[:i]), None)
    if dup is not None:
        raise ValueError(f"--data {dup}: given twice (a source is read once; give it a larger weight instead)")
    weights = [w for _, w in items]
    if any(w is None for w in weights) and any(w is not None for w in weights):
        raise ValueError("--data: give a weight to every source or to none (e.g. --data A:0.7,B:0.3)")
    stated = None if weights[0] is None else tuple(float(w) for w in weights)
    return (paths[0] if len(paths) == 1 else tuple(paths)), stated


def check_sources(sources: Sequence[str], weights: Optional[Sequence[float]], val_data: Optional[str],
                  backend: str, fakes: str) -> Optional[Tuple[float, ...]]:
    """The weights of a run on several sources, checked with the settings such a run cannot take."""
    if weights is not None:
        if len(weights) != len(sources):
            raise ValueError(f"--data: {len(weights)} weights for {len(sources)} sources")
        if not all(isinstance(w, (int, float)) and math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"--data: weights {list(weights)}: each must be a positive number")
    if val_data is not None:
        raise ValueError("--val-data: with several --data sources each source's own 'val' split is used "
                         "(and reported on its own)")
    for data in sources:
        if is_pattern(data):
            raise ValueError(f"--data {data}: with several sources each must be a pack output (a folder or URL "
                             "with train and val splits), not a shard pattern")
    if backend == "dali":
        raise ValueError("--data (several sources): not implemented in the DALI backend; use --backend torch "
                         "(or auto)")
    if fakes != "all":
        raise ValueError("--fakes sbi-only: not implemented with several --data sources")
    return None if weights is None else tuple(float(w) for w in weights)


def source_names(sources: Sequence[str]) -> List[str]:
    """A short, unique name per source (its folder name; ``_2``, ``_3`` ... for repeats), safe in a CSV
    header and a TensorBoard tag."""
    names: List[str] = []
    for data in sources:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(data).rstrip("/")).name) or "source"
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names
