"""Where a split's shards are: a pack output (its manifest, local or at a URL) or a local shard pattern.

Both loader backends start here, so a missing manifest, shard or index file gives the same clear
error whichever backend runs.

* A pack output folder or URL (``s3://bucket/faces-v1``, ``https://host/faces-v1``, ``file://...``):
  its ``manifest.json`` is read (through fsspec for URLs, `shard_tools.storage`) and checked against
  a schema once (`check_manifest`: one message naming the field); it gives the shard names, sample
  counts, byte sizes and SHA-256 of every split. Local shards are checked to exist as regular files
  with the listed size (a FIFO would block ``open`` forever); remote ones are checked when read.
* A local brace pattern (``/data/train-{000000..000009}.tar``) names ONE split: file names that start
  with another split's name (``val`` asked, ``train-000000.tar`` given) are refused, and so is a
  pattern inside a folder that an interrupted pack left without a manifest. Sample counts are
  then counted from the tar headers by the torch backend.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from tqdm import tqdm

from pipeline.data.tar_reader import TarFormatError, count_samples
from shard_tools import storage
from shard_tools.format import MANIFEST, is_remote
from shard_tools.fsutil import cache_root, loads_json, sha256_matches, sha256_stream

logger = logging.getLogger(__name__)

VERIFY_HINT = "run `deepfake-inspect {root} --verify` to check the pack output, or re-run `deepfake-pack`"
SPLIT_NAMES = ("train", "val", "test")


class DataError(RuntimeError):
    """A pack output or shard list that cannot be read as asked; the message names the file."""


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split.

    Attributes:
        split: split name (``train`` or ``val``).
        shards: local paths or URLs, in manifest order.
        indexes: DALI ``.idx`` paths or URLs parallel to ``shards``, or None when unknown.
        shard_sizes: samples per shard (manifest), or None for a pattern.
        shard_bytes / shard_sha256: per shard from the manifest, or None.
        root: the pack output folder or URL, or None for a pattern.
        storage_options: fsspec options for URLs (`shard_tools.storage`).
        class_counts: ``{"real": n, "fake": n}`` of the split (manifest), or empty.
        faces: the face-stage settings the pack used (``manifest["faces"]["settings"]``), or None.
    """

    split: str
    shards: List[str]
    indexes: Optional[List[str]] = None
    shard_sizes: Optional[List[int]] = None
    shard_bytes: Optional[List[Optional[int]]] = None
    shard_sha256: Optional[List[Optional[str]]] = None
    root: Optional[str] = None
    storage_options: Dict[str, Any] = field(default_factory=dict)
    class_counts: Dict[str, int] = field(default_factory=dict)
    faces: Optional[Dict[str, Any]] = None

    @property
    def num_samples(self) -> Optional[int]:
        return sum(self.shard_sizes) if self.shard_sizes is not None else None

    @property
    def remote(self) -> bool:
        return any(is_remote(s) for s in self.shards)

    @property
    def fingerprint(self) -> Optional[str]:
        """What the split is, as its manifest lists it: SHA-256 over each shard's name, sample count, bytes and
        SHA-256 (the same for a byte-identical re-pack, different for any other); None without a manifest."""
        if self.shard_sha256 is None or any(v is None for v in self.shard_sha256):
            return None
        listed = [[Path(s).name, n, b, h] for s, n, b, h in zip(self.shards, self.shard_sizes or [], self.shard_bytes or [],
                                                                 self.shard_sha256)]
        return hashlib.sha256(json.dumps(listed, separators=(",", ":")).encode()).hexdigest()

    def hint(self) -> str:
        return VERIFY_HINT.format(root=self.root or (Path(self.shards[0]).parent if self.shards else "OUT"))


def _field(where: str, cond: bool, what: str) -> None:
    if not cond:
        raise DataError(f"{where}: {what}; not a deepfake-pack manifest, or a damaged one (re-run deepfake-pack)")


def _nonneg_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_shard_entry(path: str, split: str, i: int, entry: Any) -> None:
    where = f"{path}: splits.{split}.shards[{i}]"
    _field(where, isinstance(entry, dict), "expected an object")
    name = entry.get("name")
    _field(f"{where}.name", isinstance(name, str) and name.endswith(".tar"), f"expected a .tar file name, got {name!r}")
    _field(f"{where}.name", "/" not in name and "\\" not in name and "\0" not in name and not name.startswith("."),
           f"{name!r} is not a plain file name inside the pack output")
    _field(f"{where}.num_samples", _nonneg_int(entry.get("num_samples")),
           f"expected a whole number >= 0, got {entry.get('num_samples')!r}")
    if entry.get("bytes") is not None:
        _field(f"{where}.bytes", _nonneg_int(entry["bytes"]), f"expected a whole number >= 0, got {entry['bytes']!r}")
    if entry.get("sha256") is not None:
        sha = entry["sha256"]
        _field(f"{where}.sha256", isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha),
               "expected 64 lower-case hex digits")
    index = entry.get("index")
    if index is not None:
        _field(f"{where}.index", isinstance(index, str) and "/" not in index and "\0" not in index
               and not index.startswith("."),
               f"{index!r} is not a plain file name inside the pack output")


def check_manifest(manifest: Any, path: str) -> dict:
    """Validate the parts of a manifest the loaders use; DataError naming the first bad field."""
    _field(path, isinstance(manifest, dict), f"expected a JSON object, got {type(manifest).__name__}")
    splits = manifest.get("splits")
    _field(f"{path}: splits", isinstance(splits, dict), f"expected an object of splits, got {type(splits).__name__}")
    for split, info in splits.items():
        _field(f"{path}: splits.{split}", isinstance(info, dict), "expected an object")
        shards = info.get("shards", [])
        _field(f"{path}: splits.{split}.shards", isinstance(shards, list), "expected a list")
        for i, entry in enumerate(shards):
            _check_shard_entry(path, split, i, entry)
        if "num_samples" in info:
            total = sum(e["num_samples"] for e in shards)
            _field(f"{path}: splits.{split}.num_samples", info["num_samples"] == total,
                   f"{info['num_samples']!r} but its shards hold {total}")
    return manifest


def _regular_file(path: str, what: str, hint: str) -> int:
    """Size of ``path``; DataError unless it is a regular file (a FIFO or device would block or lie)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"{what} {path} is missing or unreadable ({e.strerror}); {hint}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{what} {path} is not a regular file (a FIFO, device or folder); {hint}")
    return st.st_size


def load_manifest(root: Union[str, Path], storage_options: Optional[dict] = None) -> dict:
    """Read and check ``root/manifest.json`` (local folder or URL); raise DataError naming what is wrong."""
    text = str(root)
    if is_remote(text):
        path = storage.join(text, MANIFEST)
        try:
            return check_manifest(storage.read_json(path, storage_options=storage_options), path)
        except storage.StorageError as e:
            if e.kind == "not-found":
                raise DataError(f"{path} is missing: {text} is not a complete pack output (an interrupted pack "
                                f"leaves no manifest); re-run `deepfake-pack --out {text}`") from None
            raise DataError(str(e)) from None
    root = Path(text)
    if not root.exists():
        raise DataError(f"{root}: no such pack output folder")
    if not root.is_dir():
        raise DataError(f"{root}: expected a pack output folder (with {MANIFEST}), got a file")
    path = root / MANIFEST
    if not path.exists():
        raise DataError(f"{path} is missing: {root} is not a complete pack output (an interrupted pack leaves no "
                        f"manifest); re-run `deepfake-pack --out {root}` to rebuild it")
    _regular_file(str(path), "manifest", VERIFY_HINT.format(root=root))
    try:
        manifest = loads_json(path.read_bytes())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the manifest ({e}); " + VERIFY_HINT.format(root=root)) from None
    return check_manifest(manifest, str(path))


def _pattern(text: str, split: str, need_index: bool) -> ShardSet:
    import braceexpand

    shards = list(braceexpand.braceexpand(text))
    hint = f"pass the pack output folder instead of a pattern, or check {text}"
    for s in shards:
        _regular_file(s, "shard", hint)
        other = next((n for n in SPLIT_NAMES if n != split and Path(s).name.startswith(f"{n}-")), None)
        if other is not None:
            raise DataError(f"shard pattern {text} names the {other!r} split ({Path(s).name}), not {split!r}: "
                            f"a pattern is one split; give the {split} shards explicitly")
    for folder in sorted({Path(s).parent for s in shards}):
        if not (folder / MANIFEST).exists() and any(folder.glob(".tmp-*")):
            raise DataError(f"{folder} holds an interrupted deepfake-pack output (temp files, no {MANIFEST}); "
                            f"re-run deepfake-pack, then pass the folder")
    indexes = [str(Path(s).with_suffix(".idx")) for s in shards]
    if not all(Path(c).is_file() for c in indexes):
        if need_index:
            raise DataError(f"no DALI index (.idx beside each .tar) for {text}: make them with "
                            "`wds2idx SHARD.tar SHARD.idx`, or pass a pack output folder")
        indexes = None
    return ShardSet(split=split, shards=shards, indexes=indexes)


def is_pattern(data: Union[str, Path]) -> bool:
    """True for a local shard pattern or file (one split), False for a pack output folder or URL."""
    text = str(data)
    return not is_remote(text) and ("{" in text or text.endswith(".tar")) and not Path(text).is_dir()


def resolve_shards(data: Union[str, Path], split: str, *, need_index: bool = False,
                   storage_options: Optional[dict] = None) -> ShardSet:
    """Resolve ``data`` (a pack output folder or URL, or a local brace pattern) to the shards of ``split``.

    ``need_index`` makes a missing ``.idx`` file an error (DALI). URLs are checked when read.
    """
    text = str(data)
    if text.startswith("pipe:"):
        raise DataError(f"{text}: `pipe:` commands are not read; pass the pack output URL (s3://..., https://...) "
                        "and the shards are streamed through fsspec")
    remote = is_remote(text)
    if is_pattern(text):
        return _pattern(text, split, need_index)
    manifest = load_manifest(text, storage_options)
    root = text.rstrip("/") if remote else text
    splits = manifest["splits"]
    if split not in splits or not splits[split].get("shards"):
        have = ", ".join(sorted(k for k, v in splits.items() if v.get("shards"))) or "none"
        raise DataError(f"{storage.join(root, MANIFEST)}: no {split!r} split in this pack output "
                        f"(splits with shards: {have})")
    hint = VERIFY_HINT.format(root=root)
    shards, indexes = [], []
    entries = splits[split]["shards"]
    for entry in entries:
        tar = storage.join(root, entry["name"])
        index = storage.join(root, entry.get("index") or entry["name"][:-4] + ".idx")
        if not remote:
            have = _regular_file(tar, "shard", hint)
            if entry.get("bytes") is not None and entry["bytes"] != have:
                raise DataError(f"shard {tar} is {have} bytes but the manifest says {entry['bytes']}: truncated or "
                                f"replaced; {hint}")
            if need_index:
                _regular_file(index, "DALI index", hint)
        shards.append(tar)
        indexes.append(index)
    return ShardSet(split=split, shards=shards, indexes=indexes, shard_sizes=[e["num_samples"] for e in entries],
                    shard_bytes=[e.get("bytes") for e in entries], shard_sha256=[e.get("sha256") for e in entries],
                    root=root, storage_options=dict(storage_options or {}),
                    class_counts={k: int(v) for k, v in (splits[split].get("classes") or {}).items()},
                    faces=_face_settings(manifest, text))


def _face_settings(manifest: dict, where: str) -> Optional[Dict[str, Any]]:
    faces = manifest.get("faces")
    if faces is None:
        return None
    settings = faces.get("settings") if isinstance(faces, dict) else None
    if not isinstance(settings, dict):
        raise DataError(f"{where}: manifest faces.settings is not an object; re-run deepfake-pack")
    return settings


def cache_name(url: str) -> str:
    """The file name a remote shard has in a torch-backend ``--cache-dir`` (unique per URL)."""
    return hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + Path(url).name


def verify_shards(shardset: ShardSet, *, cache_dir: Optional[str] = None, progress: bool = True) -> None:
    """Hash every shard of ``shardset`` against its manifest SHA-256 (`--verify-data`): local shards and the
    copies in ``cache_dir`` are read and hashed again whatever was recorded (a cached copy that differs is
    downloaded again); remote shards without a cache are hashed as they stream. DataError naming the first
    shard that differs."""
    if shardset.shard_sha256 is None:
        raise DataError(f"--verify-data needs a pack output with a manifest (SHA-256 per shard), not {shardset.shards[0]}")
    sizes = shardset.shard_bytes or [None] * len(shardset.shards)
    for shard, want, nbytes in tqdm(list(zip(shardset.shards, shardset.shard_sha256, sizes)),
                                    desc=f"verify {shardset.split}", unit="shard", disable=not progress):
        if want is None:
            continue
        try:
            if not is_remote(shard):
                ok = sha256_matches(shard, want, rehash=True)
            elif cache_dir is not None:
                storage.download_verified(shard, cache_dir, size=nbytes, sha256=want, name=cache_name(shard),
                                          storage_options=shardset.storage_options, rehash=True)
                ok = True
            else:
                with storage.open_url(shard, storage_options=shardset.storage_options) as f:
                    ok = sha256_stream(f) == want
        except storage.StorageError as e:
            raise DataError(f"{e}; {shardset.hint()}") from None
        except OSError as e:
            raise DataError(f"shard {shard}: cannot read it ({e.strerror or e}); {shardset.hint()}") from None
        if not ok:
            raise DataError(f"shard {shard}: its SHA-256 differs from the manifest's {want[:16]}...: corrupt or "
                            f"replaced; {shardset.hint()}")


def default_cache_dir() -> str:
    """Where remote shards are cached when no ``--cache-dir`` is given (`shard_tools.fsutil.cache_root`):
    ``$DEEPFAKE_CACHE_DIR``, else ``$XDG_CACHE_HOME/deepfake-pipeline`` (``~/.cache/deepfake-pipeline``)."""
    return str(cache_root())


def localize(shardset: ShardSet, cache_dir: str, *, workers: int = 8, progress: bool = True) -> ShardSet:
    """Download a remote split's shards and ``.idx`` files into ``cache_dir/<hash of the pack URL>/``
    (in parallel; each checked against the manifest's size and SHA-256 before it gets its final
    name, and reused on later runs when it is there whole); returns the same split on local paths."""
    import concurrent.futures

    if not shardset.remote:
        return shardset
    folder = Path(cache_dir) / hashlib.sha256(str(shardset.root).encode()).hexdigest()[:16]
    jobs = [(url, nbytes, sha) for url, nbytes, sha in zip(shardset.shards, shardset.shard_bytes or [None] * len(
        shardset.shards), shardset.shard_sha256 or [None] * len(shardset.shards))]
    jobs += [(url, None, None) for url in shardset.indexes or []]
    logger.info("downloading %d shards and %d index files of %s to %s (DALI reads local files)",
                len(shardset.shards), len(shardset.indexes or []), shardset.root, folder)

    def fetch(job) -> str:
        url, nbytes, sha = job
        return str(storage.download_verified(url, folder, size=nbytes, sha256=sha,
                                             storage_options=shardset.storage_options))

    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            paths = list(tqdm(pool.map(fetch, jobs), total=len(jobs), desc="download", unit="file",
                              disable=not progress))
    except storage.StorageError as e:
        raise DataError(f"{e}; {shardset.hint()}") from None
    n = len(shardset.shards)
    return ShardSet(split=shardset.split, shards=paths[:n], indexes=paths[n:] or None,
                    shard_sizes=shardset.shard_sizes, shard_bytes=shardset.shard_bytes,
                    shard_sha256=shardset.shard_sha256, root=str(folder))


def sample_counts(shardset: ShardSet, data: Union[str, Path]) -> List[int]:
    """Samples per shard: the manifest's counts (`resolve_shards` checked each tar's size), or for a
    pattern of local shards counted from the tar headers with the reader's own grouping."""
    if shardset.shard_sizes is not None:
        return list(shardset.shard_sizes)
    logger.info("counting samples in %d shards of %s (no manifest)", len(shardset.shards), data)
    counts = []
    for shard in shardset.shards:
        try:
            counts.append(count_samples(shard))
        except (OSError, TarFormatError) as exn:
            raise DataError(f"shard {shard}: cannot read it as a tar ({exn}); "
                            + VERIFY_HINT.format(root=Path(shard).parent)) from None
    return counts
