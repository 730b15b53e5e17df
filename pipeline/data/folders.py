"""Score image files directly (no packing): a map-style Dataset + DataLoader for evaluate and predict.

Preprocessing is exactly the loaders' eval path: decode to upright uint8 RGB with
`shard_tools.imageio.load_rgb` (content decides the format, as in the packer), optionally apply a
robustness degradation (`pipeline.augment.degrade`) at the original resolution, resize with
`pipeline.augment.batch_ops.resize_uint8` to the checkpoint's ``image_size`` in the DataLoader workers (uint8
crosses the process boundary), then `pipeline.augment.batch_ops.normalize` on the target device.

A file that cannot be read is never fatal: its row gets the `shard_tools.imageio.BadImage` reason.
Samples inside local tar shards can be scored through the same path (`shard_items`), which is how
``evaluate --data ... --robustness`` reads the shard images.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from pipeline.data.tar_reader import iter_members
from shard_tools.format import CLASS_NAMES, IMAGE_EXTS, is_remote
from shard_tools.fsutil import loads_json
from shard_tools.imageio import BadImage
from shard_tools.inputs import Candidate, InputError, walk_folder

logger = logging.getLogger(__name__)

Degrade = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Item:
    """One image to score.

    Attributes:
        path: the file path, or the sample key for a shard sample (the row's id).
        label: 0 real, 1 fake, -1 unknown (predict).
        group: the input folder or path it came from (per-folder metrics).
        tar: ``(shard path, byte offset, size)`` of the image member for a shard sample, else None.
        source: the original relative path recorded in a shard sample's json (or, for a face crop made at
            scoring time, the photo/video it came from), else "".
        data: the encoded image itself (a face crop made at scoring time), else None.
        face: the face-stage metadata of a crop (``kind``, ``frame``, ``index``, ...), else None.
    """

    path: str
    label: int = -1
    group: str = ""
    tar: Optional[Tuple[str, int, int]] = None
    source: str = ""
    data: Optional[bytes] = None
    face: Optional[dict] = None


def collect(paths: Iterable[Union[str, Path]], *, label: int = -1) -> Tuple[List[Item], List[dict]]:
    """Items for files and folders, and skip records; raise FileNotFoundError naming a missing path.

    Folders are walked with the packer's rules (`shard_tools.inputs.walk_folder`: sorted, recursive,
    hidden names skipped with reason ``hidden``, symlink loops with ``symlink-loop``). Nothing is
    filtered by extension: the content decides (`load_rgb`), so a non-image becomes a row with reason
    ``not-an-image`` instead of silently disappearing. A path given explicitly is always kept.
    ``group`` is the path as given. Skip records are ``{"path", "label", "reason", "detail"}``.
    """
    items: List[Item] = []
    skips: List[dict] = []
    name = CLASS_NAMES[label] if label in (0, 1) else None
    for p in paths:
        path = Path(p)
        if path.is_dir():
            n = len(items)
            for c in _walk(str(p), label):
                if isinstance(c, Candidate):
                    items.append(Item(c.path, label, str(p)))
                else:
                    skips.append({"path": c.path, "label": name, "reason": c.reason, "detail": c.detail})
            if len(items) == n:
                logger.warning("%s: folder has no files", path)
        elif path.exists() or path.is_symlink():
            items.append(Item(str(path), label, str(p)))
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return items, skips


def _walk(folder: str, label: int):
    """`walk_folder` with errors naming the flag the caller has: --real/--fake, or none for predict's PATHs."""
    try:
        yield from walk_folder(folder, max(label, 0))
    except InputError as e:
        if label in (0, 1):
            raise
        raise InputError(re.sub(r"^--real ", "", str(e))) from None


# BadImage details name the packer's flags; scoring has none of them, only the packer's limits.
_PACK_FLAGS = ((re.compile(r"--max-pixels (\d+)"), r"the limit of \1 pixels"),
               (re.compile(r"--min-size (\d+)"), r"the smallest side of \1 px"))


def bad_image_reason(e: BadImage) -> str:
    """``str(e)`` without the packer's flags (scoring has none of them), with the packer's limits kept."""
    text = str(e)
    for pattern, words in _PACK_FLAGS:
        text = pattern.sub(words, text)
    return text


def shard_items(shards: Sequence[str]) -> List[Item]:
    """One Item per sample of local tar shards (``KEY.cls`` + ``KEY.jpg|png|webp`` + ``KEY.json``).

    Reads member headers and the small cls/json members only; image bytes are read later by
    offset, so any number of DataLoader workers can read one shard. Raises ValueError naming the
    shard for a sample without a label or an image.
    """
    items = []
    for shard in shards:
        if is_remote(shard) or not Path(shard).is_file():
            raise ValueError(f"{shard}: reading shard images one by one (evaluate --robustness or --errors, the train "
                             "grid) needs local .tar files, not URLs: copy the pack output to a local folder first")
        samples: Dict[str, dict] = {}
        with open(shard, "rb") as f:  # keys and extensions as the loaders read them (pipeline.data.tar_reader)
            for key, ext, offset, size in iter_members(shard):
                s = samples.setdefault(key, {})
                if ext in IMAGE_EXTS:
                    s["image"] = (shard, offset, size)
                elif ext in ("cls", "json"):
                    f.seek(offset)
                    s[ext] = _small_member(f.read(size), ext, shard, key)
        for key, s in samples.items():
            if "image" not in s or "cls" not in s:
                raise ValueError(f"{shard}: sample {key} has no image or no .cls member")
            source, face = s.get("json", ("", None))
            items.append(Item(key, s["cls"], Path(shard).name, s["image"], source, face=face))
    return items


def _small_member(data: bytes, ext: str, shard: str, key: str):
    """The label of a ``cls`` member, or ``(source, face)`` of a ``json`` member (``face``: the face-stage
    metadata, or None); ValueError naming the shard and sample for one the packer did not write."""
    hint = "run `deepfake-inspect` on the pack output with --verify"
    if ext == "cls":
        if data.strip() not in (b"0", b"1"):
            raise ValueError(f"{shard}: sample {key}.cls is {data[:20]!r}, not 0 or 1; {hint}")
        return int(data.strip())
    try:
        meta = loads_json(data)
    except ValueError as e:
        raise ValueError(f"{shard}: sample {key}.json is not valid JSON ({e}); {hint}") from None
    source = meta.get("source", "") if isinstance(meta, dict) else None
    if not isinstance(source, str):
        raise ValueError(f"{shard}: sample {key}.json has no text 'source' (not an object the packer writes); {hint}")
    return source, meta.get("face") if isinstance(meta.get("face"), dict) else None


def read_item(item: Item):
    """What `shard_tools.imageio.load_rgb` reads for ``item``: its bytes, its path, or its bytes inside a shard."""
    if item.data is not None:
        return item.data
    if item.tar is None:
        return item.path
    shard, offset, size = item.tar
    with open(shard, "rb") as f:
        f.seek(offset)
        return f.read(size)


