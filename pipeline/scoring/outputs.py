"""What every entry point does with its outputs: check where they go before any work starts, write them
so that a failed or interrupted run leaves no half file (and evaluate no half set of files), and show
any path the OS allows in one line of valid UTF-8.

Paths in outputs. A file name is bytes on POSIX; Python hands undecodable bytes over as surrogate
escapes, which no UTF-8 writer accepts. Every CSV, JSON and log line here is valid UTF-8: a path is
written as text (`shown`: unchanged when it is printable UTF-8; otherwise each byte that is not UTF-8
becomes ``\\xNN`` and control characters ``\\n``, ``\\t``, ``\\xNN``), and where a row names a file, a
``path_bytes_hex`` field (`path_hex`) holds the exact bytes in hex whenever the text form is not the
path itself (empty or null otherwise): ``os.fsdecode(bytes.fromhex(h))`` gives the path back.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import resource
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

# lone surrogates (undecodable bytes), C0/C1 controls, line and paragraph separators
_UNSHOWABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


class OutputError(RuntimeError):
    """An output that cannot be written where asked; one line naming the flag or the file."""


def _escape(m: "re.Match[str]") -> str:
    ch = m.group()
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the original byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def shown(value) -> str:
    """``value`` (a path, an exception, any text) as one line of valid UTF-8 (see the module docstring)."""
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    return _UNSHOWABLE.sub(_escape, text)


def showable(obj):
    """``obj`` (JSON-like: dicts, lists, strings, numbers) with every string, keys too, through `shown`."""
    if isinstance(obj, dict):
        return {shown(k): showable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [showable(v) for v in obj]
    return shown(obj) if isinstance(obj, str) else obj


def path_hex(path: PathLike) -> str:
    """The bytes of ``path`` in hex when `shown` cannot write it as it is, else ``""``."""
    text = os.fspath(path)
    return "" if shown(text) == text else os.fsencode(text).hex()


def _ancestor(path: Path) -> Path:
    """The nearest part of ``path`` that exists (``path`` itself, or a parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_creatable(flag: str, path: Path) -> None:
    """``path`` can be created or replaced: the nearest existing folder above it must be one this
    process may write in."""
    top = _ancestor(path.parent)
    if not top.is_dir():
        raise OutputError(f"{flag} {shown(path)}: cannot create it: {shown(top)} is a file, not a folder")
    if not os.access(top, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only(top) else "is not writable by this user"
        raise OutputError(f"{flag} {shown(path)}: cannot create it: {shown(top)} {why}")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_output_dir(flag: str, path: PathLike) -> Path:
    """A folder of outputs: an existing writable folder, or one that can be created; else OutputError."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise OutputError(f"{flag} {shown(path)}: is a file, not a folder; choose a folder for the outputs")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"{flag} {shown(path)}: folder is not writable"
                              + (" (read-only file system)" if _read_only(path) else " by this user"))
        return path
    _check_creatable(flag, path)
    return path


def check_output_file(flag: str, path: PathLike, what: str = "file name") -> Path:
    """One output file: absent (its folder creatable) or a regular file that can be replaced; else OutputError."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {shown(path)}: is a folder; give a {what}")
    if path.exists() and not stat.S_ISREG(os.stat(path).st_mode):
        raise OutputError(f"{flag} {shown(path)}: is not a regular file (a FIFO or device); give a {what}")
    _check_creatable(flag, path)
    return path


def check_apart(flag: str, out: PathLike, inputs: Sequence[Tuple[str, PathLike]]) -> None:
    """Refuse an output that is a given input file, or lies in (or is) a local input folder: the input
    tree would change, and the next run would read the outputs as inputs. ``inputs`` are
    ``(flag, path)`` pairs; URLs and paths that do not exist are passed over."""
    o = os.path.realpath(out)
    for in_flag, path in inputs:
        text = os.fspath(path)
        if "://" in text or text.startswith("pipe:") or not os.path.exists(text):
            continue
        i = os.path.realpath(text)
        inside = os.path.isdir(i) and os.path.commonpath([o, i]) == i
        if inside or o == i:
            where = "is" if o == i else "is inside"
            raise OutputError(f"{flag} {shown(out)} {where} {in_flag} {shown(path)}: the outputs would change an "
                              "input (and be read as input next time); write them elsewhere")


def out_of_memory(e: BaseException, image_size: Optional[int], batch_size: int) -> Optional[str]:
    """One line for an allocation that failed (torch's allocators, CUDA out of memory, MemoryError), naming
    the sizes that set it and what to lower; None for any other error. ``image_size`` None: the size is not a
    flag of the command (scoring takes the checkpoint's)."""
    text = str(e)
    if not (isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()):
        return None
    m = re.search(r"allocate ([0-9]+) bytes", text)
    asked = f" ({int(m.group(1)) / 2**20:.0f} MiB at once)" if m else ""
    where = "GPU" if "CUDA" in text or "cuda" in text else "memory"
    if image_size is None:
        return f"out of {where}{asked} with --batch-size {batch_size}: lower --batch-size (or raise the memory limit)"
    return (f"out of {where}{asked} at --image-size {image_size} with --batch-size {batch_size}: lower --batch-size "
            "or --image-size (or raise the memory limit)")


def exit_on_out_of_memory(command: str, batch_size: int, run: Callable[[], int]) -> int:
    """``run()``, or exit status 2 with one line (`out_of_memory`) when an allocation fails (scoring commands:
    their batch is the one thing to lower); any other error propagates."""
    try:
        return run()
    except (RuntimeError, MemoryError) as e:
        line = out_of_memory(e, None, batch_size)
        if line is None:
            raise
        logging.getLogger(command).error("%s: %s", command, line)
        return 2


def _reason(e: BaseException, path: Path) -> str:
    """Why a write failed, in words; also for torch/safetensors errors that name no errno."""
    code = getattr(e, "errno", None)
    match = re.search(r"os error (\d+)", str(e))  # safetensors' Rust I/O errors
    if code is None and match:
        code = int(match.group(1))
    if code == errno.EFBIG:
        return "file too large (the file-size limit, `ulimit -f`, was reached)"
    if code is not None:
        return (getattr(e, "strerror", None) or os.strerror(code)).lower()
    try:
        free = f"{shutil.disk_usage(_ancestor(path)).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = f", a file-size limit of {soft} bytes is set (ulimit -f)" if soft != resource.RLIM_INFINITY else ""
    detail = " ".join(str(e).split())[:100]
    return f"the write failed ({free}{limit}; {type(e).__name__}: {detail})"


@contextlib.contextmanager
def writing(path: PathLike, what: str = "") -> Iterator[None]:
    """Turn a failed write of ``path`` (OSError, or the RuntimeError torch and safetensors raise) into
    one OutputError line naming it: ``cannot write PATH: no space left on device``."""
    try:
        yield
    except OutputError:
        raise
    except Exception as e:  # noqa: BLE001 - only I/O failures are turned into a line, the rest re-raised
        if not isinstance(e, (OSError, RuntimeError)) and type(e).__name__ != "SafetensorError":
            raise
        label = f"{what} {shown(path)}" if what else shown(path)
        raise OutputError(f"cannot write {label}: {_reason(e, Path(path))}") from None


class OutputSet:
    """A set of files that appears in ``out`` together, or not at all.

    Each file is first written (by the usual atomic writers) into a staging folder ``out/.tmp-<random>``;
    `commit` moves them into ``out`` with ``last`` moved last (its presence marks a complete set),
    and removes the ``stale`` names this run did not write (outputs of an earlier run with other
    options). `discard` (also on leaving the ``with`` block by an error) removes the staging folder,
    so a failed run leaves ``out`` as it was.
    """

    def __init__(self, out: PathLike, *, last: str, stale: Sequence[str] = ()) -> None:
        self.out, self.last, self.stale = Path(out), last, tuple(stale)
        self._stage: Optional[Path] = None
        self._files: Dict[str, Path] = {}

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.discard()

    def path(self, name: str) -> Path:
        """Where to write output ``name`` now (inside the staging folder)."""
        if self._stage is None:
            with writing(self.out):
                self.out.mkdir(parents=True, exist_ok=True)
                self._stage = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.out))
        self._files[name] = self._stage / name
        return self._files[name]

    def final(self, name: str) -> Path:
        return self.out / name

    def commit(self) -> list:
        """Move the staged files into ``out`` (``last`` last); returns their final names."""
        names = sorted(self._files, key=lambda n: (n == self.last, n))
        with writing(self.out):
            for name in self.stale:
                if name not in self._files and (self.out / name).is_file():
                    (self.out / name).unlink()
            for name in names:
                os.replace(self._files[name], self.out / name)
        self._files.clear()
        self.discard()
        return names

    def discard(self) -> None:
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None
        self._files.clear()
