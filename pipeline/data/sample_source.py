"""A piece of a shard -> its raw samples, checked: the torch backend's reading half.

Where the bytes come from:

* a local shard: `pipeline.data.tar_reader.iter_samples` (headers walked over mmap);
* a remote shard (``s3://``, ``https://``, any fsspec URL) without a cache: streamed through fsspec
  (`shard_tools.storage.open_url`) and webdataset's own tar iterator, never downloaded whole; the
  samples before the piece's start are read and skipped;
* a remote shard with ``cache_dir``: downloaded once, whole, to a temp name, checked against the
  manifest's size and SHA-256 and renamed (`shard_tools.storage.download_verified`), then read
  locally like any shard; a half-downloaded shard never has its final name, so it is never used.

What is checked, per sample, at a cost of a few microseconds (so a corrupt shard never trains
silently): members (``cls``, one image), ``cls`` is ASCII 0/1 and equals the label in the sample's
``json``, and for samples stored with their original bytes (``normalized`` null) the SHA-256 of the
image bytes equals the ``json`` sha256 and its first 32 hex digits the key. Per piece: the shard
holds exactly the samples the manifest says (neither fewer nor more). Per shard, so that a shard
replaced by another of the same pack (same count, valid samples) never trains as duplicates: its
bytes match the manifest's SHA-256 (a local or cached file once per version of the file,
`shard_tools.fsutil.sha256_matches`; a stream as it is read to its end, which one piece of every
shard does each epoch). A stream that fails on the way is read on where it stopped, up to the
``attempts`` of ``--storage-options``. Every failure is a `DataError` naming the shard and the sample.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from pipeline.data.shards import DataError, cache_name
from pipeline.data.tar_reader import TarFormatError, iter_samples, iter_stream_samples
from shard_tools import storage
from shard_tools.format import IMAGE_EXTS, is_remote
from shard_tools.fsutil import loads_json, sha256_matches


@dataclass(frozen=True)
class Piece:
    """Samples ``[start, stop)`` of one shard of ``size`` samples (``nbytes``/``sha256`` from the manifest)."""

    url: str
    start: int
    stop: int
    size: int
    nbytes: Optional[int] = None
    sha256: Optional[str] = None


def plan_pieces(shards: Sequence[str], sizes: Sequence[int], order: Sequence[int], lo: int, hi: int,
                nbytes: Optional[Sequence[Optional[int]]] = None,
                sha256: Optional[Sequence[Optional[str]]] = None) -> List[Piece]:
    """The pieces covering samples ``[lo, hi)`` of the shards concatenated in ``order``."""
    pieces, offset = [], 0
    for i in order:
        a, b = max(lo, offset), min(hi, offset + sizes[i])
        if a < b:
            pieces.append(Piece(shards[i], a - offset, b - offset, sizes[i],
                                nbytes[i] if nbytes else None, sha256[i] if sha256 else None))
        offset += sizes[i]
    return pieces


def check_sample(sample: dict, hint: str) -> Tuple[str, int]:
    """(image extension, label) of a raw sample; DataError naming the shard and key when it is not
    what the packer wrote."""
    key, url = sample["__key__"], sample.get("__url__", "?")
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise DataError(f"shard {url}: sample {key} has no image member (.jpg/.png/.webp; it has "
                        f"{', '.join(members) or 'nothing'}); {hint}")
    cls = sample.get("cls")
    if cls is None or cls.strip() not in (b"0", b"1"):
        raise DataError(f"shard {url}: sample {key}.cls is {cls!r}, expected ASCII 0 (real) or 1 (fake); {hint}")
    label = int(cls.strip())
    meta = sample.get("json")
    if meta is not None:
        try:
            info = loads_json(meta)
        except ValueError:
            raise DataError(f"shard {url}: sample {key}.json is not valid JSON; {hint}") from None
        if isinstance(info, dict):
            _check_meta(info, sample[ext], label, f"{key}.{ext}", url, hint)
    return ext, label


def _check_meta(info: dict, data: bytes, label: int, member: str, url: str, hint: str) -> None:
    key = member.rsplit(".", 1)[0]
    if info.get("label") is not None and info["label"] != label:
        raise DataError(f"shard {url}: sample {key}.cls says {label} but {key}.json says label {info['label']}: "
                        f"the label was changed; {hint}")
    sha = info.get("sha256")
    if isinstance(sha, str) and info.get("normalized") is None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha or not sha.startswith(key):
            raise DataError(f"shard {url}: {member}: the image bytes do not match their SHA-256 "
                            f"({digest[:12]}... vs {sha[:12]}...): corrupt; {hint}")


class _Hashed:
    """A read-only file object that hashes every byte read through it (a shard streamed from its start)."""

    def __init__(self, f) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        return data


class SampleSource:
    """Reads pieces of shards (local, remote streamed, or remote through a verified local cache)."""

    def __init__(self, *, hint: str, storage_options: Optional[dict] = None, cache_dir: Optional[str] = None) -> None:
        self.hint, self.storage_options, self.cache_dir = hint, dict(storage_options or {}), cache_dir

    def local_path(self, piece: Piece) -> Optional[str]:
        """The file to read ``piece`` from (its bytes checked against the manifest's SHA-256, once per version
        of the file), or None to stream it from its URL."""
        if not is_remote(piece.url):
            if piece.sha256 is not None and not sha256_matches(piece.url, piece.sha256):
                raise DataError(f"shard {piece.url}: its SHA-256 differs from the manifest's: changed or replaced "
                                f"since packing (another shard copied over it?); {self.hint}")
            return piece.url
        if self.cache_dir is None:
            return None
        try:
            return str(storage.download_verified(piece.url, self.cache_dir, size=piece.nbytes, sha256=piece.sha256,
                                                 name=cache_name(piece.url), storage_options=self.storage_options))
        except storage.StorageError as e:
            raise DataError(f"{e}; {self.hint}") from None

    def samples(self, piece: Piece) -> Iterator[dict]:
        """The checked raw samples of ``piece``; DataError for a short, long, unreadable or corrupt shard. A
        stream that fails on the way (`shard_tools.storage.TRANSIENT`) is opened again and read on from the
        sample where it stopped, up to ``attempts`` times."""
        last = piece.stop == piece.size  # read one past the end: a shard must not hold more than listed
        index, retry = piece.start, 0
        while True:
            try:
                path = self.local_path(piece) if retry == 0 else path
                for sample in (iter_samples(path, index, None if last else piece.stop) if path is not None
                               else self._stream(piece, index, last)):
                    if index >= piece.stop:
                        raise DataError(f"shard {piece.url} holds more than the {piece.size} samples the manifest "
                                        f"says: replaced or the manifest edited; {self.hint}")
                    check_sample(sample, self.hint)
                    yield sample
                    index += 1
                break
            except (TarFormatError, OSError) as exn:
                where = "cannot open it" if isinstance(exn, OSError) else f"cannot read sample {index}"
                raise DataError(f"shard {piece.url}: {where} ({exn}): missing, truncated or corrupt; {self.hint}") from None
            except storage.StorageError as e:
                retry += 1
                if e.kind not in storage.TRANSIENT or retry >= storage.attempts_of(self.storage_options):
                    tries = f" (tried {retry} times)" if retry > 1 else ""
                    raise DataError(f"{e}{tries}; {self.hint}") from None
                time.sleep(storage.backoff_s(retry - 1))
        if index < piece.stop:
            raise DataError(f"shard {piece.url} ends after {index} samples but should hold {piece.size}: "
                            f"truncated or replaced; {self.hint}")

    def _stream(self, piece: Piece, start: int, last: bool) -> Iterator[dict]:
        """Samples from ``start`` of a streamed shard; one read to the end (``last``) also hashes every byte
        against the manifest's SHA-256, at no extra transfer."""
        with storage.open_url(piece.url, storage_options=self.storage_options) as f:
            hashed = _Hashed(f) if last and piece.sha256 else None
            yield from iter_stream_samples(hashed or f, piece.url, start, None if last else piece.stop)
            if hashed is not None:
                while hashed.read(1 << 20):  # the tar's end blocks and padding
                    pass
                if hashed.sha.hexdigest() != piece.sha256:
                    raise DataError(f"shard {piece.url}: its SHA-256 differs from the manifest's: changed or replaced "
                                    f"since packing (another shard copied over it?); {self.hint}")
