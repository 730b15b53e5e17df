"""Atomic file writes (a crash or SIGKILL never leaves a half-written file under its final name), SHA-256 of
files remembered per version of the file, JSON parsing that fails as ValueError, and temp folders that a
later run removes when their owner was killed."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Union

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


def file_mode() -> int:
    """The mode ``open()`` gives a new regular file: ``0o666 & ~umask`` (0644 under the usual umask 022).

    Read from ``/proc/self/status`` where it exists: setting the umask to read it would change it
    process-wide for a moment, under other threads' feet.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[str]:
    """Yield a temp file name beside ``path`` for a writer that wants a name, not a file object.

    On success the temp file is fsynced, given ``file_mode()`` (mkstemp makes 0600 files) and renamed to
    ``path``; on any error it is deleted. Temp names are ``.tmp-<name>.<random>``, so a rerun can tell
    whose leftover a temp file is.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: Union[str, Path], mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside ``path``; on success fsync and rename it to ``path``, else delete it.

    Temp names start with ``.tmp-<name>.`` so a rerun can recognise leftovers; the final file gets
    ``file_mode()``, as a plain ``open()`` would give it.
    """
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Union[str, Path], obj, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_savefig(fig, path: Union[str, Path], **kwargs) -> None:
    """matplotlib ``fig.savefig`` through a temp file (format taken from ``path``'s suffix)."""
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    with atomic_open(path, "wb") as f:
        fig.savefig(f, **kwargs)


def sha256_stream(f: IO[bytes]) -> str:
    """Hex SHA-256 of everything left to read in ``f``, read in 1 MiB blocks."""
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def sha256_file(path: Union[str, Path]) -> str:
    """Hex SHA-256 of the file at ``path``."""
    with open(path, "rb") as f:
        return sha256_stream(f)


def loads_json(data: Union[str, bytes]) -> Any:
    """``json.loads``, with a document nested too deeply for the parser (RecursionError) as a ValueError."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply (not a document this tool writes)") from None


def cache_root() -> Path:
    """The tools' cache folder: ``$DEEPFAKE_CACHE_DIR``, else ``$XDG_CACHE_HOME/deepfake-pipeline``
    (``~/.cache/deepfake-pipeline``): downloaded shards (DALI) and the records of `sha256_matches`."""
    if os.environ.get("DEEPFAKE_CACHE_DIR"):
        return Path(os.environ["DEEPFAKE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "deepfake-pipeline")


def _identity(path: Union[str, Path]) -> list:
    """What changes whenever the file's bytes can have changed: device, inode, size, mtime and ctime (a copy
    over it, ``cp -p`` or ``touch -d`` included: the ctime cannot be set back)."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _record(path: Union[str, Path]) -> Path:
    key = hashlib.sha256(os.fsencode(os.path.abspath(path))).hexdigest()[:32]
    return cache_root() / "verified" / f"{key}.json"


def remember_sha256(path: Union[str, Path], digest: str, identity: Optional[list] = None) -> None:
    """Record that the file at ``path``, as it is now (or was at ``identity``), hashes to ``digest``; best effort."""
    try:
        now = _identity(path)
        if identity is None or identity == now:
            atomic_write_json(_record(path), {"path": os.fsdecode(os.path.abspath(path)), "identity": now,
                                              "sha256": digest}, indent=None)
    except OSError as e:  # a read-only or full cache folder only costs a hash next time
        logger.debug("cannot record the SHA-256 of %s: %s", path, e)


def sha256_matches(path: Union[str, Path], want: str, *, rehash: bool = False) -> bool:
    """True when the bytes of ``path`` hash to ``want``. Each version of a file is hashed once: the result is
    recorded in `cache_root` under the file's identity (`_identity`), so a file copied over it, rewritten or
    replaced is hashed again; ``rehash`` hashes it whatever the record says."""
    identity = _identity(path)
    if not rehash:
        try:
            rec = json.loads(_record(path).read_text())
            if rec.get("identity") == identity and rec.get("sha256") == want:
                return True
        except (OSError, ValueError, AttributeError):
            pass
    digest = sha256_file(path)
    if digest == want:
        remember_sha256(path, digest, identity)
    return digest == want


_OWNER = ".owner.lock"


def _sweep(prefix: str) -> None:
    """Remove ``prefix*`` folders in the temp folder whose owner process is gone (its flock is released)."""
    top = Path(tempfile.gettempdir())
    for folder in top.glob(f"{prefix}*"):
        lock = folder / _OWNER
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # not one of ours, or being set up right now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_size == 0:  # its owner has not locked it yet
                continue
            logger.info("removing %s, left by an interrupted run", folder)
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass  # held: its owner is still running
        finally:
            os.close(fd)


@contextlib.contextmanager
def owned_tempdir(prefix: str) -> Iterator[Path]:
    """A temp folder ``$TMPDIR/<prefix>XXXX`` removed at the end, like ``tempfile.TemporaryDirectory``; held
    by an flock on a file inside, so that after a SIGKILL the next run with the same prefix removes it."""
    _sweep(prefix)
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    fd = os.open(folder / _OWNER, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: a sweeper may hold it for a moment
        os.write(fd, f"pid {os.getpid()}\n".encode())
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)
