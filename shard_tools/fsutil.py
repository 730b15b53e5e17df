"""Atomic file writes: a crash or SIGKILL never leaves a half-written file under its final name."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator, Union

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_open(path: Union[str, Path], mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside ``path``; on success fsync and rename it to ``path``, else delete it.

    Temp names start with ``.tmp-`` so a rerun can recognise and remove leftovers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)  # mkstemp makes 0600 files: give the final file the usual permissions
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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


def remove_temp_files(folder: Union[str, Path]) -> int:
    """Delete ``.tmp-*`` leftovers of interrupted atomic writes in ``folder``; returns how many."""
    n = 0
    for p in Path(folder).glob(f"{TMP_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n
