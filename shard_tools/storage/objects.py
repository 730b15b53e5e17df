"""Objects at URLs (`shard_tools.storage`): open, read, list, upload, download (verified), create
exclusively, delete. Every failure is one `StorageError` line (`shard_tools.storage.core`)."""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import IO, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

from tqdm import tqdm

from shard_tools import fsutil
from shard_tools.format import MANIFEST
from shard_tools.storage.core import (_ATOMIC_PUT, _HTTP, _S3, _TMP_PREFIX, PathLike, StorageError, _translated,
                                      filesystem, join, protocol_of, retried)

logger = logging.getLogger("shard_tools.storage")

@contextlib.contextmanager
def open_url(url: PathLike, mode: str = "rb", *, storage_options: Optional[dict] = None) -> Iterator[IO[bytes]]:
    """Open ``url`` (or a local path) like ``open``, as a context manager. Failures inside the block become
    StorageError for ``url`` (so keep the block to reading/writing the file)."""
    fs, path = filesystem(url, storage_options)
    with _translated(url), fs.open(path, mode) as f:
        yield f


def read_bytes(url: PathLike, *, storage_options: Optional[dict] = None, expected_size: Optional[int] = None) -> bytes:
    """The whole object at ``url``; StorageError ``short`` when ``expected_size`` is given and not met."""
    fs, path = filesystem(url, storage_options)

    def cat() -> bytes:
        with _translated(url):
            return fs.cat_file(path)

    data = retried(url, storage_options, cat)
    if expected_size is not None and len(data) != expected_size:
        raise StorageError(str(url), "short" if len(data) < expected_size else "mismatch",
                           f"{len(data)} bytes, expected {expected_size} (object truncated or replaced)")
    return data


def _info(url: PathLike, storage_options: Optional[dict]) -> Optional[dict]:
    fs, path = filesystem(url, storage_options)

    def info() -> dict:
        with _translated(url):
            return fs.info(path)

    try:
        return retried(url, storage_options, info)
    except StorageError as e:
        if e.kind == "not-found":
            return None
        raise


def exists(url: PathLike, *, storage_options: Optional[dict] = None) -> bool:
    """True if ``url`` is an object/file (or folder); False only when it is missing, StorageError otherwise."""
    return _info(url, storage_options) is not None


def size(url: PathLike, *, storage_options: Optional[dict] = None) -> int:
    """Size of the object at ``url`` in bytes (StorageError ``not-found`` when missing)."""
    info = _info(url, storage_options)
    if info is None or info.get("size") is None:
        raise StorageError(str(url), "not-found", "no such object (or the server gives no size)")
    return int(info["size"])


def list_names(url: PathLike, *, storage_options: Optional[dict] = None) -> List[str]:
    """Names of the objects directly under the folder/prefix ``url`` (``[]`` when there is none)."""
    fs, path = filesystem(url, storage_options)

    def ls() -> list:
        with _translated(url):
            return fs.ls(path, detail=False)

    try:
        entries = retried(url, storage_options, ls)
    except StorageError as e:
        if e.kind == "not-found":
            return []
        raise
    return sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in entries)


def list_tree(url: PathLike, *, storage_options: Optional[dict] = None) -> List[str]:
    """Keys of every object below the prefix ``url``, recursively, relative to it (``a/b.jpg``), in the order
    the store gives; ``[""]`` when ``url`` is itself an object, ``[]`` when nothing is there."""
    fs, path = filesystem(url, storage_options)
    base = str(path).rstrip("/")

    def find() -> list:
        with _translated(url):
            return fs.find(base, detail=False)

    found = [str(p).rstrip("/") for p in retried(url, storage_options, find)]
    return [p[len(base) + 1:] if p != base else "" for p in found if p == base or p.startswith(base + "/")]


def _put(fs, local: Path, remote: str, url: str) -> None:
    with _translated(url):
        if protocol_of(url) in _ATOMIC_PUT:
            fs.put_file(str(local), remote)
            return
        parent, name = remote.rstrip("/").rsplit("/", 1) if "/" in remote else ("", remote)
        tmp = f"{parent}/{_TMP_PREFIX}{name}.{uuid.uuid4().hex[:8]}" if parent else f"{_TMP_PREFIX}{name}"
        fs.put_file(str(local), tmp)
        try:
            fs.mv(tmp, remote)
        except BaseException:
            with contextlib.suppress(Exception):
                fs.rm_file(tmp)
            raise


def upload_folder(local_dir: PathLike, url: PathLike, files: Iterable[str], *, workers: int = 8,
                  last: Sequence[str] = (MANIFEST,), storage_options: Optional[dict] = None,
                  before_last: Optional[Callable[[], None]] = None) -> None:
    """Upload ``local_dir/name`` to ``url/name`` for each name in ``files``: ``workers`` threads in parallel,
    then ``before_last()`` (a last check, e.g. that a lock is still held), then the names in ``last`` one
    by one, so a remote folder is whole only once its manifest is there."""
    url, local_dir = str(url), Path(local_dir)
    if protocol_of(url) in _HTTP:
        raise StorageError(url, "read-only", "HTTP(S) is read-only here: upload to s3:// (or another writable "
                           "fsspec URL) and serve that over HTTP")
    names = list(dict.fromkeys(files))
    first = [n for n in names if n not in last]
    final = [n for n in last if n in names]
    fs, root = filesystem(url, storage_options)
    if protocol_of(url) not in _ATOMIC_PUT:  # a folder-based filesystem: the folder must exist
        with _translated(url):
            fs.makedirs(root, exist_ok=True)
    total = sum((local_dir / n).stat().st_size for n in names)
    bar = tqdm(total=total, desc="upload", unit="B", unit_scale=True, dynamic_ncols=True)
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            jobs = {pool.submit(_put, fs, local_dir / n, f"{root.rstrip('/')}/{n}", join(url, n)): n for n in first}
            try:
                for job in concurrent.futures.as_completed(jobs):
                    job.result()
                    bar.update((local_dir / jobs[job]).stat().st_size)
            except BaseException:
                for job in jobs:
                    job.cancel()
                raise
        if before_last is not None:
            before_last()
        for n in final:
            _put(fs, local_dir / n, f"{root.rstrip('/')}/{n}", join(url, n))
            bar.update((local_dir / n).stat().st_size)
    finally:
        bar.close()
    logger.info("uploaded %d files (%.1f MB) to %s, %s last", len(names), total / 1e6, url, ", ".join(final) or "none")



def download_verified(url: PathLike, dest_dir: PathLike, *, size: Optional[int] = None, sha256: Optional[str] = None,
                      name: Optional[str] = None, storage_options: Optional[dict] = None, rehash: bool = False) -> Path:
    """Download ``url`` to ``dest_dir/name`` (default: the URL's last part) through a ``.tmp-*`` file; the final
    name appears only after ``size`` and ``sha256`` (each when given) matched, else StorageError and no file.

    A file already at the final name with the right ``size`` is reused (``dest_dir`` is a download cache) once
    its bytes match ``sha256``: hashed once per version of the file (`fsutil.sha256_matches`, so a warm cache
    stays fast), again with ``rehash``; a cached copy that no longer matches is downloaded again.
    """
    url, dest_dir = str(url), Path(dest_dir)
    final = dest_dir / (name or url.rstrip("/").rsplit("/", 1)[-1])
    if dest_dir.exists() and not dest_dir.is_dir():
        raise StorageError(str(dest_dir), "cache", "is a file, not a folder: cannot keep downloads there; give "
                           "another --cache-dir (or remove the file)")
    if os.path.lexists(final) and not final.is_file():
        raise StorageError(str(final), "cache", f"is not a regular file (a folder?) where the downloaded copy of "
                           f"{url} goes; remove it")
    if final.is_file() and size is not None and final.stat().st_size == size:
        if sha256 is None or fsutil.sha256_matches(final, sha256, rehash=rehash):
            return final
        logger.warning("%s: the cached copy of %s does not match the manifest's SHA-256 (changed on disk); "
                       "downloading it again", final, url)
    dest_dir.mkdir(parents=True, exist_ok=True)
    fs, path = filesystem(url, storage_options)

    def get() -> Path:
        fd, tmp_name = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{final.name}.", dir=dest_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with _translated(url):
                fs.get_file(path, str(tmp))
            got = tmp.stat().st_size
            if size is not None and got != size:
                raise StorageError(url, "short" if got < size else "mismatch",
                                   f"{got} bytes, expected {size} (object truncated, replaced or corrupt)")
            digest = fsutil.sha256_file(tmp)
            if sha256 is not None and digest != sha256:
                raise StorageError(url, "mismatch", "sha256 differs from the manifest (object changed or corrupt)")
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        fsutil.remember_sha256(final, digest)
        return final

    return retried(url, storage_options, get)


@contextlib.contextmanager
def local_copy(url: PathLike, *, storage_options: Optional[dict] = None) -> Iterator[str]:
    """A local file holding the object at ``url`` (its own name kept: extensions are checked), downloaded into a
    temp folder that is removed when the block ends; a local path is yielded as it is."""
    if "://" not in str(url):
        yield str(url)
        return
    with tempfile.TemporaryDirectory(prefix="deepfake-input-") as tmp:
        yield str(download_verified(url, tmp, storage_options=storage_options))


def create_exclusive(url: PathLike, data: bytes, *, storage_options: Optional[dict] = None) -> None:
    """Create the object ``url`` holding ``data`` only if there is none: on S3 a conditional PUT
    (``If-None-Match: *``), which the store applies atomically. StorageError ``exists`` when an object is
    there; ``unsupported`` when the store refuses the condition; ``no-lock`` for any other protocol."""
    proto = protocol_of(url)
    if proto not in _S3:
        raise StorageError(str(url), "no-lock", f"{proto}:// offers no atomic create-if-absent that deepfake-pack "
                           "can use to keep two writers apart; write to s3:// or to a local folder")
    fs, path = filesystem(url, storage_options)
    try:
        with _translated(url):
            try:
                fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                raise StorageError(str(url), "exists", "already exists") from None
    except StorageError as e:
        if e.kind == "other" and "not implemented" in e.message.lower().replace("notimplemented", "not implemented"):
            raise StorageError(str(url), "unsupported", f"the store does not implement conditional writes "
                               f"(If-None-Match): {e.message}") from None
        raise


def upload_file(local: PathLike, url: PathLike, *, storage_options: Optional[dict] = None) -> None:
    """Upload one local file to ``url`` (whole or not at all, as ``upload_folder``); no progress bar (task-safe)."""
    fs, path = filesystem(url, storage_options)
    _put(fs, Path(local), path, str(url))


def write_bytes(url: PathLike, data: bytes, *, storage_options: Optional[dict] = None) -> None:
    """Write ``data`` to ``url``, replacing what is there: one PUT on object stores, a temp name then a move
    elsewhere (a reader never sees half an object)."""
    fs, path = filesystem(url, storage_options)
    if protocol_of(url) in _ATOMIC_PUT:
        with _translated(url):
            fs.pipe_file(path, data)
        return
    with tempfile.TemporaryDirectory(prefix="deepfake-put-") as tmp:
        local = Path(tmp, "data")
        local.write_bytes(data)
        _put(fs, local, path, str(url))


def remove_object(url: PathLike, *, storage_options: Optional[dict] = None) -> None:
    """Delete the object ``url`` (no error when it is already gone)."""
    fs, path = filesystem(url, storage_options)
    try:
        with _translated(url):
            fs.rm_file(path)
    except StorageError as e:
        if e.kind != "not-found":
            raise


def remove_pack(url: PathLike, names: Iterable[str], *, storage_options: Optional[dict] = None) -> int:
    """Delete ``url/name`` for each name that exists (``manifest.json`` first, so the prefix reads as
    incomplete from the first delete on); nothing else under ``url`` is touched. Returns how many."""
    url = str(url)
    names = sorted(set(names), key=lambda n: (n != MANIFEST, n))
    fs, root = filesystem(url, storage_options)
    present = set(list_names(url, storage_options=storage_options))
    doomed = [n for n in names if n in present]
    with _translated(url):
        if MANIFEST in doomed:
            fs.rm_file(f"{root.rstrip('/')}/{MANIFEST}")
        rest = [f"{root.rstrip('/')}/{n}" for n in doomed if n != MANIFEST]
        if rest:
            fs.rm(rest)
    return len(doomed)


def read_json(url: PathLike, *, storage_options: Optional[dict] = None) -> Dict:
    """The JSON document at ``url`` (StorageError ``other`` when it does not parse)."""
    data = read_bytes(url, storage_options=storage_options)
    try:
        return fsutil.loads_json(data)
    except ValueError as e:
        raise StorageError(str(url), "other", f"not valid JSON ({e})") from None
