"""Where a split's shards are: a pack output folder (its manifest) or a shard URL/brace pattern.

Both loader backends start here, so a missing manifest, shard or index file gives the same clear
error whichever backend runs.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

from shard_tools.format import MANIFEST, is_remote

logger = logging.getLogger(__name__)



VERIFY_HINT = "run `deepfake-inspect {root} --verify` to check the pack output, or re-run `deepfake-pack`"


class DataError(RuntimeError):
    """A pack output or shard list that cannot be read as asked; the message names the file."""


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split.

    Attributes:
        split: split name (``train`` or ``val``).
        shards: local paths or URLs (``pipe:...``, ``s3://...``), in manifest order.
        indexes: DALI ``.idx`` paths parallel to ``shards``, or None when unknown (URL patterns).
        shard_sizes: samples per shard, or None when unknown.
        root: the pack output folder, or None for URL patterns.
    """

    split: str
    shards: List[str]
    indexes: Optional[List[str]] = None
    shard_sizes: Optional[List[int]] = None
    root: Optional[Path] = None

    @property
    def num_samples(self) -> Optional[int]:
        return sum(self.shard_sizes) if self.shard_sizes is not None else None


def load_manifest(root: Union[str, Path]) -> dict:
    """Read ``root/manifest.json``; raise DataError naming what is wrong."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such pack output folder")
    if not root.is_dir():
        raise DataError(f"{root}: expected a pack output folder (with {MANIFEST}), got a file")
    path = root / MANIFEST
    if not path.exists():
        raise DataError(
            f"{path} is missing: {root} is not a complete pack output (an interrupted pack leaves no "
            f"manifest); re-run `deepfake-pack --out {root}` to rebuild it"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the manifest ({e}); " + VERIFY_HINT.format(root=root)) from e
    if not isinstance(manifest, dict) or "splits" not in manifest:
        raise DataError(f"{path}: not a deepfake-pack manifest (no 'splits' key)")
    return manifest


def resolve_shards(data: Union[str, Path], split: str, *, need_index: bool = False) -> ShardSet:
    """Resolve ``data`` to the shards of ``split``.

    ``data`` is a pack output folder, or a shard pattern such as ``/data/train-{000000..000007}.tar``
    or ``pipe:curl -s https://host/train-{000000..000007}.tar`` (brace-expanded; the split is then
    whatever the pattern names). ``need_index`` makes a missing ``.idx`` file an error (DALI).
    """
    text = str(data)
    is_pattern = "{" in text or text.startswith(("pipe:", "s3://", "gs://", "http://", "https://")) or text.endswith(".tar")
    if is_pattern and not Path(text).is_dir():
        import braceexpand

        shards = list(braceexpand.braceexpand(text))
        local = [s for s in shards if not is_remote(s)]
        for s in local:
            if not Path(s).exists():
                raise DataError(f"shard {s} does not exist (from pattern {text})")
        indexes = None
        if local and len(local) == len(shards):
            cand = [str(Path(s).with_suffix(".idx")) for s in shards]
            if all(Path(c).exists() for c in cand):
                indexes = cand
        if need_index and indexes is None:
            raise DataError(
                f"no DALI index (.idx beside each .tar) for {text}: make them with `wds2idx SHARD.tar SHARD.idx`, "
                "or pass a pack output folder"
            )
        return ShardSet(split=split, shards=shards, indexes=indexes)

    root = Path(text)
    manifest = load_manifest(root)
    splits = manifest["splits"]
    if split not in splits or not splits[split].get("shards"):
        have = ", ".join(sorted(k for k, v in splits.items() if v.get("shards"))) or "none"
        raise DataError(f"{root / MANIFEST}: no {split!r} split in this pack output (splits with shards: {have})")
    entries = splits[split]["shards"]
    shards, indexes, sizes = [], [], []
    for entry in entries:
        tar = root / entry["name"]
        if not tar.exists():
            raise DataError(f"shard {tar} listed in the manifest is missing; " + VERIFY_HINT.format(root=root))
        want, have = entry.get("bytes"), tar.stat().st_size
        if want is not None and int(want) != have:
            raise DataError(f"shard {tar} is {have} bytes but the manifest says {want}: truncated or replaced; "
                            + VERIFY_HINT.format(root=root))
        shards.append(str(tar))
        sizes.append(int(entry["num_samples"]))
        idx = root / entry["index"] if entry.get("index") else tar.with_suffix(".idx")
        if need_index and not idx.exists():
            raise DataError(f"DALI index {idx} for shard {tar} is missing; " + VERIFY_HINT.format(root=root))
        indexes.append(str(idx))
    return ShardSet(split=split, shards=shards, indexes=indexes, shard_sizes=sizes, root=root)
