"""Remote I/O for pack outputs: the one module that talks to object storage, through fsspec only.

Any fsspec URL works (``s3://`` through s3fs, ``http(s)://`` through fsspec's HTTP filesystem, ``file://``,
``memory://``, ``gs://`` with gcsfs installed, ...), and so does a plain local path. Credentials and the
endpoint come the usual way (for S3: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
``AWS_PROFILE``, ``~/.aws``) or from ``--storage-options`` JSON, passed to the fsspec filesystem as keyword
arguments (e.g. ``{"endpoint_url": "http://127.0.0.1:9000", "anon": true}``). Three keys of that JSON are
ours, not fsspec's: ``connect_timeout`` and ``read_timeout`` (seconds) and ``attempts`` (tries per request),
applied to s3fs (botocore ``config_kwargs``) and HTTP (aiohttp ``ClientTimeout``), so nothing hangs.

Every failure is raised as one :class:`StorageError` naming the URL and what to do; no botocore or aiohttp
exception leaves this module. Writes never let a half-written object look whole: on object stores a PUT
is atomic per object; elsewhere a temp name is written and then moved; ``upload_folder`` writes the
manifest last, so a remote folder without one still reads as incomplete.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import IO, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from tqdm import tqdm

from shard_tools.fsutil import sha256_file
from shard_tools.format import MANIFEST

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
ATTEMPTS = 3
_OUR_KEYS = ("connect_timeout", "read_timeout", "attempts")
_S3 = ("s3", "s3a")
_HTTP = ("http", "https")
_ATOMIC_PUT = _S3 + ("gs", "gcs", "az", "abfs", "abfss", "oss")  # object stores: a PUT appears whole or not at all
_TMP_PREFIX = ".tmp-"
_LIBS = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "asyncio")
_HINTS = {  # protocol -> (unreachable, denied)
    "s3": ("check the endpoint (--storage-options endpoint_url or AWS_ENDPOINT_URL) and the network",
           "check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws, or "
           "--storage-options key/secret) and that they may access this bucket"),
    "http": ("check the host and port in the URL and the network",
             "check that the server lets you read this path (a token can go in --storage-options client_kwargs)"),
    "other": ("check the URL and the network", "check the credentials or permissions for this location"),
}
PathLike = Union[str, Path]


class StorageError(Exception):
    """A remote (or local) read/write failed; ``str()`` is one line: ``URL: what happened; what to do``.

    ``kind`` is one of ``unreachable``, ``timeout``, ``no-bucket``, ``denied``, ``not-found``, ``short``,
    ``mismatch``, ``read-only``, ``no-filesystem``, ``other``.
    """

    def __init__(self, url: str, kind: str, message: str):
        super().__init__(f"{url}: {message}")
        self.url, self.kind, self.message = url, kind, message

    def __reduce__(self):  # picklable as itself: raised in a pool or Ray task, re-raised on the driver
        return StorageError, (self.url, self.kind, self.message)


def parse_storage_options(text: Optional[str], flag: str = "--storage-options") -> dict:
    """``--storage-options`` JSON text → dict (None or empty → ``{}``); ValueError naming ``flag`` otherwise."""
    if text is None or not str(text).strip():
        return {}
    try:
        opts = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{flag} must be a JSON object such as '{{\"endpoint_url\": \"http://host:9000\"}}', "
                         f"got {text!r} ({e})") from None
    if not isinstance(opts, dict):
        raise ValueError(f"{flag} must be a JSON object (keys are fsspec filesystem arguments), got {text!r}")
    for key in _OUR_KEYS:
        if key in opts and (not isinstance(opts[key], (int, float)) or isinstance(opts[key], bool) or opts[key] <= 0):
            raise ValueError(f"{flag}: {key} must be a positive number, got {opts[key]!r}")
    return opts


def join(url: PathLike, *names: str) -> str:
    """``url`` with ``names`` appended by ``/`` (a local path joins as a path)."""
    text = str(url)
    if "://" not in text:
        return str(Path(text, *names))
    return "/".join([text.rstrip("/"), *names])


def protocol_of(url: PathLike) -> str:
    text = str(url)
    return text.split("://", 1)[0].lower() if "://" in text else "file"


def filesystem(url: PathLike, storage_options: Optional[dict] = None):
    """``(fsspec filesystem, path inside it)`` for ``url``, with our timeouts and retry count applied."""
    import fsspec

    opts = dict(storage_options or {})
    connect = float(opts.pop("connect_timeout", CONNECT_TIMEOUT_S))
    read = float(opts.pop("read_timeout", READ_TIMEOUT_S))
    attempts = int(opts.pop("attempts", ATTEMPTS))
    proto = protocol_of(url)
    if proto in _S3:
        config = {"connect_timeout": connect, "read_timeout": read,
                  "retries": {"max_attempts": attempts, "mode": "standard"}}
        config.update(opts.get("config_kwargs") or {})
        opts["config_kwargs"] = config
        opts.setdefault("use_listings_cache", False)  # a stale listing would hide a fresh upload
    elif proto in _HTTP:
        import aiohttp

        client = dict(opts.get("client_kwargs") or {})
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read))
        opts["client_kwargs"] = client
        opts.setdefault("use_listings_cache", False)
    try:
        fs, path = fsspec.core.url_to_fs(str(url), **opts)
    except (ImportError, ValueError) as e:
        raise StorageError(str(url), "no-filesystem", f"no filesystem for {proto}:// ({e}); install the fsspec "
                           "package for it (s3fs for s3://, aiohttp for http://, gcsfs for gs://)") from None
    except TypeError as e:
        raise StorageError(str(url), "other", f"bad --storage-options for {proto}:// ({e})") from None
    if proto in _S3:
        fs.retries = 1  # s3fs's own retry loop would multiply botocore's attempts (and the time to fail)
    return fs, path


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _classify(exc: BaseException, url: str) -> Tuple[str, str]:
    """``(kind, message)`` for a failure raised by fsspec, s3fs, botocore or aiohttp while accessing ``url``."""
    proto = protocol_of(url)
    unreachable, denied = _HINTS["s3" if proto in _S3 else "http" if proto in _HTTP else "other"]
    for e in _chain(exc):
        name, text = type(e).__name__, str(e)
        status = getattr(e, "status", None)
        if isinstance(status, int) and name == "ClientResponseError":  # aiohttp: an HTTP error status
            if status in (401, 403):
                return "denied", f"access denied (HTTP {status}); {denied}"
            if status == 404:
                return "not-found", "no such object (HTTP 404)"
            return "other", f"HTTP {status} {getattr(e, 'message', '')}".rstrip()
        if name == "NoSuchBucket" or "bucket does not exist" in text:
            bucket = url.split("://", 1)[-1].split("/", 1)[0]
            return "no-bucket", f"bucket {bucket!r} does not exist; create it or fix the URL"
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerDisconnectedError",
                    "ConnectionRefusedError", "ProxyConnectionError") or isinstance(e, ConnectionRefusedError):
            return "unreachable", f"cannot reach the server ({type(e).__name__}); {unreachable}"
        if name in ("ReadTimeoutError", "FSTimeoutError", "ServerTimeoutError") or isinstance(e, TimeoutError):
            return "timeout", ("the server stopped answering (timeout); retry, or raise --storage-options "
                               "read_timeout/connect_timeout (seconds)")
        if name in ("ClientPayloadError", "IncompleteRead", "ResponseStreamingError", "ContentLengthError"):
            return "short", "the connection closed before the whole object arrived (truncated transfer); retry"
        if name in ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound"):
            return "denied", f"no usable credentials ({text}); {denied}"
        if isinstance(e, PermissionError) or name in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            return "denied", f"access denied ({text}); {denied}"
    for e in _chain(exc):
        if isinstance(e, FileNotFoundError):
            return "not-found", "no such object"
    return "other", f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _translated(url: PathLike) -> Iterator[None]:
    """Re-raise any storage failure inside the block as one StorageError for ``url``."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        # botocore/aiohttp errors derive from Exception only; other libraries' errors (a bug) pass through
        if not isinstance(e, (OSError, ValueError, RuntimeError)) and type(e).__module__.split(".")[0] not in _LIBS:
            raise
        kind, message = _classify(e, str(url))
        logger.debug("%s: %s", url, message, exc_info=e)
        raise StorageError(str(url), kind, message) from None


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
    with _translated(url):
        data = fs.cat_file(path)
    if expected_size is not None and len(data) != expected_size:
        raise StorageError(str(url), "short" if len(data) < expected_size else "mismatch",
                           f"{len(data)} bytes, expected {expected_size} (object truncated or replaced)")
    return data


def _info(url: PathLike, storage_options: Optional[dict]) -> Optional[dict]:
    fs, path = filesystem(url, storage_options)
    try:
        with _translated(url):
            return fs.info(path)
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
    try:
        with _translated(url):
            entries = fs.ls(path, detail=False)
    except StorageError as e:
        if e.kind == "not-found":
            return []
        raise
    return sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in entries)


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


def upload_file(local: PathLike, url: PathLike, *, storage_options: Optional[dict] = None) -> None:
    """Upload one local file to ``url`` (whole or not at all, as ``upload_folder``); no progress bar (task-safe)."""
    fs, path = filesystem(url, storage_options)
    _put(fs, Path(local), path, str(url))


def write_bytes(url: PathLike, data: bytes, *, storage_options: Optional[dict] = None) -> None:
    """Write ``data`` to the object ``url`` (one PUT on object stores, a temp name then a move elsewhere)."""
    with tempfile.TemporaryDirectory(prefix="deepfake-put-") as tmp:
        local = Path(tmp, "data")
        local.write_bytes(data)
        upload_file(local, url, storage_options=storage_options)


def upload_folder(local_dir: PathLike, url: PathLike, files: Iterable[str], *, workers: int = 8,
                  last: Sequence[str] = (MANIFEST,), storage_options: Optional[dict] = None) -> None:
    """Upload ``local_dir/name`` to ``url/name`` for each name in ``files``: ``workers`` threads in parallel,
    then the names in ``last`` one by one, so a remote folder is whole only once its manifest is there."""
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
        for n in final:
            _put(fs, local_dir / n, f"{root.rstrip('/')}/{n}", join(url, n))
            bar.update((local_dir / n).stat().st_size)
    finally:
        bar.close()
    logger.info("uploaded %d files (%.1f MB) to %s, %s last", len(names), total / 1e6, url, ", ".join(final) or "none")



def download_verified(url: PathLike, dest_dir: PathLike, *, size: Optional[int] = None, sha256: Optional[str] = None,
                      name: Optional[str] = None, storage_options: Optional[dict] = None) -> Path:
    """Download ``url`` to ``dest_dir/name`` (default: the URL's last part) through a ``.tmp-*`` file; the final
    name appears only after ``size`` and ``sha256`` (each when given) matched, else StorageError and no file.

    A file already at the final name with the right ``size`` is returned as is: only verified downloads are
    ever renamed there, so it needs no new hash (this makes ``dest_dir`` a download cache).
    """
    url, dest_dir = str(url), Path(dest_dir)
    final = dest_dir / (name or url.rstrip("/").rsplit("/", 1)[-1])
    if final.is_file() and size is not None and final.stat().st_size == size:
        return final
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{final.name}.", dir=dest_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fs, path = filesystem(url, storage_options)
        with _translated(url):
            fs.get_file(path, str(tmp))
        got = tmp.stat().st_size
        if size is not None and got != size:
            raise StorageError(url, "short" if got < size else "mismatch",
                               f"{got} bytes, expected {size} (object truncated, replaced or corrupt)")
        if sha256 is not None and sha256_file(tmp) != sha256:
            raise StorageError(url, "mismatch", "sha256 differs from the manifest (object changed or corrupt)")
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return final


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
        return json.loads(data)
    except ValueError as e:
        raise StorageError(str(url), "other", f"not valid JSON ({e})") from None
