"""Write one WebDataset shard reproducibly, plus its DALI index, both atomically.

Members per sample, in this order: ``KEY.cls`` (``0``/``1``), ``KEY.jpg|png|webp`` (image bytes),
``KEY.json`` (source metadata, sorted keys; ``group`` and ``face`` when the pack used them). Tar format ustar, mtime 0, uid/gid 0, empty uname/gname,
mode 0o644, byte for byte what ``tarfile`` writes for those members (checked by a test): the same
samples give byte-identical tars. Each file is re-read from disk here (phase 1
kept only its hash) and must still have the hash it had, else the pack stops.
"""
from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

from shard_tools.fsutil import atomic_open, atomic_path
from shard_tools.imageio import BadImage, read_source, stored_bytes
from shard_tools.format import CLASS_NAMES, is_remote
from shard_tools.plan import Item
from shard_tools.storage import download_verified, join, redacted, upload_file


class ChangedInput(RuntimeError):
    """An input file changed or vanished between inspection and writing."""


_BLOCK = 512
_RECORD = tarfile.RECORDSIZE  # GNU tar and tarfile pad the archive to a multiple of 10240 bytes


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header tarfile writes for a regular file with the fixed metadata above.

    Built directly (tarfile.addfile costs ~120 µs per member, most of the write phase); a test checks it
    is byte-identical to ``tarfile.TarInfo.tobuf(tarfile.USTAR_FORMAT)``.
    """
    raw = name.encode("ascii")
    if len(raw) > 100 or size >= 8**11:
        raise ValueError(f"tar member {name!r} ({size} bytes) does not fit a plain ustar header")
    head = bytearray(_BLOCK)
    head[0:len(raw)] = raw
    head[100:108] = b"0000644\0"          # mode
    head[108:116] = b"0000000\0"          # uid
    head[116:124] = b"0000000\0"          # gid
    head[124:136] = b"%011o\0" % size     # size
    head[136:148] = b"00000000000\0"      # mtime 0
    head[148:156] = b" " * 8              # checksum placeholder
    head[156:157] = tarfile.REGTYPE
    head[257:265] = tarfile.POSIX_MAGIC    # "ustar\0" + version "00"
    # uname, gname, devmajor, devminor, prefix: all NUL, as tarfile writes them for a regular file
    head[148:156] = b"%06o\0 " % sum(head)
    return bytes(head)


class _TarWriter:
    """Streams members into a file, hashing and counting the bytes (no second read of the shard)."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def _write(self, b: bytes) -> None:
        self.h.update(b)
        self.n += len(b)
        self.f.write(b)

    def add(self, name: str, data: bytes) -> None:
        self._write(ustar_header(name, len(data)))
        self._write(data)
        if len(data) % _BLOCK:
            self._write(bytes(_BLOCK - len(data) % _BLOCK))

    def close(self) -> None:
        end = self.n + 2 * _BLOCK  # two zero blocks end the archive, then pad to a full record
        self._write(bytes(2 * _BLOCK + (-end) % _RECORD))


def sample_json(it: Item) -> bytes:
    meta = {"source": it.cand.rel, "root": it.cand.root, "label": it.cand.label, "sha256": it.info.sha256,
            "width": it.info.width, "height": it.info.height, "format": it.info.format,
            "normalized": it.info.normalized}
    if it.group:
        meta["group"] = it.group
    if it.face is not None:
        meta["face"] = it.face
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def write_index(tar_path: Path, idx_path: Path) -> None:
    """DALI index with the wheel's own ``wds2idx`` (via GNU tar), to a temp name then renamed."""
    from wds2idx import IndexCreator

    with atomic_path(idx_path) as tmp:
        creator = IndexCreator(str(tar_path), tmp, verbose=False)
        try:
            creator.create_index()
        finally:
            creator.close()


def write_shard(out: Path, name: str, items: List[Item], max_pixels: int,
                input_options: Optional[dict] = None) -> dict:
    """Write ``out/name`` (+ ``.idx``); return its manifest entry. ``input_options``: storage options of URL inputs."""
    tar_path = Path(out) / name
    classes = {c: 0 for c in CLASS_NAMES}
    with atomic_open(tar_path, "wb") as f:
        tar = _TarWriter(f)
        for it in items:
            path = it.data_path or it.cand.path
            try:
                data = read_source(path, storage_options=input_options)
            except BadImage as e:
                raise ChangedInput(f"{redacted(path)}: {e} (it was fine when inspected)") from None
            if hashlib.sha256(data).hexdigest() != it.info.sha256:
                raise ChangedInput(f"{redacted(path)}: file changed while packing (sha256 differs); re-run")
            tar.add(f"{it.key}.cls", str(it.cand.label).encode())
            tar.add(f"{it.key}.{it.info.ext}", stored_bytes(data, it.info, max_pixels=max_pixels))
            tar.add(f"{it.key}.json", sample_json(it))
            classes[CLASS_NAMES[it.cand.label]] += 1
        tar.close()
    idx_path = tar_path.with_suffix(".idx")
    write_index(tar_path, idx_path)
    return {"name": name, "index": idx_path.name, "num_samples": len(items), "bytes": tar.n,
            "sha256": tar.h.hexdigest(), "classes": classes}


def write_shard_task(task) -> dict:
    """Pool entry point: ``(out, name, items, max_pixels[, storage_options[, input_options]])``; URL inputs are read
    here, by the worker, with ``input_options``.

    ``out`` a folder: the shard is written there. ``out`` a URL (``deepfake-pack --ray --out s3://...``): it is
    written in a temp folder of the machine running the task, then the tar and its index are uploaded to
    ``out/name``; face crops staged at URLs are fetched first. Either way it returns the manifest entry."""
    out, name, items, max_pixels, *rest = task
    opts, input_options = (list(rest) + [None, None])[:2]
    if not is_remote(str(out)):
        return write_shard(Path(out), name, items, max_pixels, input_options)
    with tempfile.TemporaryDirectory(prefix="deepfake-pack-shard-") as tmp:
        staged = Path(tmp, "staged")
        items = [replace(it, data_path=str(download_verified(it.data_path, staged, storage_options=opts)))
                 if it.data_path and is_remote(it.data_path) else it for it in items]
        entry = write_shard(Path(tmp), name, items, max_pixels, input_options)
        for n in (name, entry["index"]):
            upload_file(Path(tmp, n), join(str(out), n), storage_options=opts)
    return entry
