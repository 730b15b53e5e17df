"""The core of `shard_tools.storage`: errors, ``--storage-options``, the fsspec filesystem of a URL with our
timeouts and retries, and the translation of every library failure into one `StorageError` line."""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

from shard_tools import fsutil

logger = logging.getLogger("shard_tools.storage")
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
ATTEMPTS = 3
_MAX_ATTEMPTS = 20
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
TRANSIENT = ("unreachable", "timeout", "short", "server")


class StorageError(Exception):
    """A remote (or local) read/write failed; ``str()`` is one line: ``URL: what happened; what to do``.

    ``kind`` is one of ``unreachable``, ``timeout``, ``no-bucket``, ``denied``, ``not-found``, ``short``,
    ``mismatch``, ``read-only``, ``no-filesystem``, ``bad-options``, ``redirect-loop``, ``server`` (HTTP 5xx or
    429), ``exists`` and ``no-lock``/``unsupported`` (`create_exclusive`), ``cache``, ``other``. Those in
    `TRANSIENT` are retried (`attempts`) where the library does not retry itself.
    """

    def __init__(self, url: str, kind: str, message: str):
        super().__init__(f"{url}: {message}")
        self.url, self.kind, self.message = url, kind, message

    def __reduce__(self):  # picklable as itself: raised in a pool or Ray task, re-raised on the driver
        return StorageError, (self.url, self.kind, self.message)


def parse_storage_options(text: Optional[str], flag: str = "--storage-options") -> dict:
    """``--storage-options`` JSON text → dict (None or empty → ``{}``); ValueError naming ``flag`` otherwise.
    Messages never repeat the text: it may hold a secret."""
    if text is None or not str(text).strip():
        return {}
    try:
        opts = fsutil.loads_json(text)
    except ValueError as e:
        raise ValueError(f"{flag} must be a JSON object such as '{{\"endpoint_url\": \"http://host:9000\"}}' "
                         f"(not valid JSON: {e})") from None
    if not isinstance(opts, dict):
        raise ValueError(f"{flag} must be a JSON object (keys are fsspec filesystem arguments), got a JSON "
                         f"{type(opts).__name__}")
    for key in _OUR_KEYS:
        value = opts.get(key, 1)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{flag}: {key} must be a positive number, got {value!r}")
    if "attempts" in opts and (opts["attempts"] != int(opts["attempts"]) or opts["attempts"] > _MAX_ATTEMPTS):
        raise ValueError(f"{flag}: attempts must be a whole number from 1 to {_MAX_ATTEMPTS}, got {opts['attempts']!r}")
    return opts


def option_names(text: Optional[str]) -> Optional[List[str]]:
    """What a run may record of ``--storage-options``: its key names (the values may be secrets), or None."""
    if text is None or not str(text).strip():
        return None
    try:
        opts = fsutil.loads_json(text)
    except ValueError:
        return ["<not JSON>"]
    return sorted(map(str, opts)) if isinstance(opts, dict) else ["<not an object>"]


def redacted(url: Optional[str]) -> Optional[str]:
    """``url`` without a password or token written into it (``https://user:TOKEN@host/...`` becomes
    ``https://user:***@host/...``): what a run may record or print of a URL."""
    if url is None or "://" not in str(url):
        return url
    proto, rest = str(url).split("://", 1)
    host, sep, path = rest.partition("/")
    if "@" in host:
        user = host.rsplit("@", 1)[0].split(":", 1)[0]
        host = f"{user}:***@{host.rsplit('@', 1)[1]}"
    return f"{proto}://{host}{sep}{path}"


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
    """``(fsspec filesystem, path inside it)`` for ``url``, with our timeouts and retry count applied.
    StorageError (``bad-options``) for an option key the filesystem does not take, before any request."""
    import fsspec

    opts = dict(storage_options or {})
    connect = float(opts.pop("connect_timeout", CONNECT_TIMEOUT_S))
    read = float(opts.pop("read_timeout", READ_TIMEOUT_S))
    attempts = int(opts.pop("attempts", ATTEMPTS))
    proto = protocol_of(url)
    _check_option_names(str(url), proto, opts)
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
        with _translated(url):  # some filesystems connect at once (ftp://, sftp://)
            fs, path = fsspec.core.url_to_fs(str(url), **opts)
    except (ImportError, StorageError) as e:
        if isinstance(e, StorageError) and "Protocol not known" not in e.message:
            raise
        raise StorageError(str(url), "no-filesystem", f"no filesystem for {proto}:// ({getattr(e, 'message', e)}); "
                           "install the fsspec package for it (s3fs for s3://, aiohttp for http://, gcsfs for gs://)"
                           ) from None
    if proto in _S3:
        fs.retries = 1  # s3fs's own retry loop would multiply botocore's attempts (and the time to fail)
    return fs, path


@functools.lru_cache(maxsize=None)
def _known_options(proto: str) -> Optional[frozenset]:
    """Option names the filesystem of ``proto`` takes (where it passes the rest on to a library that would
    fail late on an unknown one), or None when any name may be right."""
    def params(fn) -> set:
        return {n for n, p in inspect.signature(fn).parameters.items()
                if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}

    common = {"use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache"}
    try:
        if proto in _S3:
            import s3fs
            from aiobotocore.session import AioSession

            return frozenset(params(s3fs.S3FileSystem.__init__) | params(AioSession.__init__) | common)
        if proto in _HTTP:
            import aiohttp
            from fsspec.implementations.http import HTTPFileSystem

            return frozenset(params(HTTPFileSystem.__init__) | params(aiohttp.ClientSession._request) | common)
    except (ImportError, TypeError, ValueError):
        pass
    return None


def _check_option_names(url: str, proto: str, opts: dict) -> None:
    known = _known_options("s3" if proto in _S3 else "http" if proto in _HTTP else proto)
    unknown = sorted(k for k in opts if known is not None and k not in known)
    if unknown:
        lib = "s3fs" if proto in _S3 else "fsspec's HTTP filesystem (aiohttp)"
        raise StorageError(url, "bad-options", f"--storage-options key {unknown[0]!r} is not an option of {lib}; "
                           f"known: {', '.join(sorted(known - {'asynchronous', 'loop'}))[:300]}, plus ours: "
                           f"{', '.join(_OUR_KEYS)}")


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
        if isinstance(e, TypeError) and "unexpected keyword argument" in text:
            return "bad-options", f"--storage-options: {text.split('got ', 1)[-1]} ({type(e).__name__})"
        if name == "TooManyRedirects":
            return "redirect-loop", ("the server redirects in a loop (too many redirects); check the URL, or the "
                                     "server's redirect rules")
        if isinstance(status, int) and name == "ClientResponseError":  # aiohttp: an HTTP error status
            if status in (401, 403):
                return "denied", f"access denied (HTTP {status}); {denied}"
            if status == 404:
                return "not-found", "no such object (HTTP 404)"
            kind = "server" if status >= 500 or status == 429 else "other"
            return kind, f"HTTP {status} {getattr(e, 'message', '')}".rstrip()
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
        bad_option = isinstance(e, TypeError) and "unexpected keyword argument" in str(e)
        if not isinstance(e, (OSError, ValueError, RuntimeError)) and type(e).__module__.split(".")[0] not in _LIBS \
                and not bad_option:
            raise
        kind, message = _classify(e, str(url))
        logger.debug("%s: %s", url, message, exc_info=e)
        raise StorageError(str(url), kind, message) from None


def attempts_of(storage_options: Optional[dict]) -> int:
    """Tries per request that ``storage_options`` asks for (``attempts``, default 3)."""
    return int((storage_options or {}).get("attempts", ATTEMPTS))


def backoff_s(retry: int) -> float:
    """Seconds to wait before retry number ``retry`` (0, 1, ...): 0.25, 0.5, 1, 2, then 4."""
    return min(4.0, 0.25 * 2 ** retry)


def retried(url: PathLike, storage_options: Optional[dict], fn):
    """``fn()``, tried again after a `TRANSIENT` failure (with `backoff_s`) up to `attempts_of` times in all;
    S3 requests are retried by botocore already, local files never. The last failure says how many tries."""
    tries = 1 if protocol_of(url) in _S3 + ("file",) else attempts_of(storage_options)
    for retry in range(tries):
        try:
            return fn()
        except StorageError as e:
            if e.kind not in TRANSIENT or retry == tries - 1:
                if retry:
                    raise StorageError(e.url, e.kind, f"{e.message} (tried {tries} times)") from None
                raise
            logger.info("%s: %s; trying again in %.2f s", e.url, e.message, backoff_s(retry))
            time.sleep(backoff_s(retry))

