"""Atomic file writes: a crash or SIGKILL never leaves a half-written file under its final name."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator, Union

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
