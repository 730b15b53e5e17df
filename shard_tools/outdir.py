"""Who owns what in a pack output folder: the only files ``deepfake-pack`` ever removes are ones it can
prove it wrote, and two packs never write one folder at once.

Files of ours in ``OUT/`` (everything else is foreign: the pack refuses to run, naming the file):

* ``manifest.json`` with ``"tool": "deepfake-pack"``: a complete output; the shard and index names it
  lists (``{train,val}-NNNNNN.{tar,idx}``, nothing else) are ours;
* ``.deepfake-pack-run.json`` (the run marker): written atomically before the first shard, it lists
  every shard/index name the run may leave behind (its own and the previous output's); removed once
  ``manifest.json`` is in place, so it is only found after an interrupted run;
* ``.deepfake-pack.lock``: the ``fcntl.flock`` lock file, holding ``deepfake-pack pid N``; removed at the
  end of a run, left behind only by a killed one;
* temp files ``.tmp-<name>.<8 random chars>`` (``shard_tools.fsutil``) of a name above;
* ``.deepfake-pack-staging/`` holding ``owner.json`` (``deepfake-pack --ray --faces``: the face crops staged
  where every node of the cluster can read them); removed at the end of the run, or by the next run.

A folder that does not exist or is empty is fine. Locks are advisory and need a file system where
``flock`` works across the processes involved (local disks; not every network file system).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Set

from shard_tools import fsutil
from shard_tools.format import MANIFEST
from shard_tools.inputs import InputError

logger = logging.getLogger(__name__)
TOOL = "deepfake-pack"
LOCK = ".deepfake-pack.lock"
MARKER = ".deepfake-pack-run.json"
STAGING = ".deepfake-pack-staging"
_STAGING_OWNER = "owner.json"
OUTPUT_RE = re.compile(r"(train|val)-[0-9]{6}\.(tar|idx)")
_LOCK_TEXT = re.compile(r"(deepfake-pack pid [0-9]+\n?)?")
_TMP_SUFFIX = r"\.[a-z0-9_]{8}"  # what tempfile.mkstemp appends


@dataclass
class Survey:
    """What ``survey`` found: ``listed`` names the manifest/marker claim, ``removable`` those present now."""

    exists: bool = False
    complete: bool = False
    listed: Set[str] = field(default_factory=set)
    removable: List[str] = field(default_factory=list)


def _load_ours(path: Path, what: str) -> dict:
    if not _is_plain_file(path):
        raise InputError(f"{path} is not a regular file, so not a {TOOL} {what}; refusing to touch this folder: "
                         "move it away or choose another --out")
    try:
        obj = fsutil.loads_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read it as a {TOOL} {what} ({type(e).__name__}); refusing to touch "
                         "a folder this tool may not have written: move the file away or choose another --out") from None
    if not isinstance(obj, dict) or obj.get("tool") != TOOL:
        raise InputError(f"{path} is not a {TOOL} {what}; refusing to touch a folder this tool did not write: "
                         "move it away or choose another --out")
    return obj


def claimed_names(obj, where: str) -> Set[str]:
    """The shard/index names of a manifest already parsed from ``where`` (a URL): InputError unless it is a
    manifest of this tool naming only files this tool writes (the rule `survey` applies to a folder)."""
    if not isinstance(obj, dict) or obj.get("tool") != TOOL:
        raise InputError(f"{where} is not a {TOOL} manifest; refusing to touch a prefix this tool did not write: "
                         "move it away or choose another --out")
    return _names_in(where, obj, "manifest")


def _names_in(path, obj: dict, what: str) -> Set[str]:
    """The output names a manifest (``splits``) or marker (``outputs``) claims; each must follow our naming rule."""
    if what == "manifest":
        splits = obj.get("splits")
        shards = [e for s in (splits.values() if isinstance(splits, dict) else []) if isinstance(s, dict)
                  for e in (s.get("shards") if isinstance(s.get("shards"), list) else [])]
        names = [v for e in shards if isinstance(e, dict) for v in (e.get("name"), e.get("index"))]
    else:
        names = obj.get("outputs") if isinstance(obj.get("outputs"), list) else [None]
    bad = [n for n in names if not (isinstance(n, str) and OUTPUT_RE.fullmatch(n))]
    if bad:
        raise InputError(f"{path} lists {bad[0]!r}, which is not a file name {TOOL} writes; "
                         "refusing to remove anything: move the folder away or choose another --out")
    return set(names)


def lock_holder(out: Path) -> Optional[str]:
    """``"pid N"`` (or ``"pid unknown"``) when another process holds ``out``'s lock, else None; changes nothing."""
    try:
        fd = os.open(out / LOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # absent, or not a plain file (survey refuses those)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_text(fd)
    finally:
        os.close(fd)  # also releases the probe's shared lock
    return None


def _holder_text(fd: int) -> str:
    text = os.pread(fd, 100, 0).decode("ascii", "replace")
    m = re.search(r"pid ([0-9]+)", text)
    if not m:
        return "pid unknown"
    pid = int(m.group(1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid}, which has exited: processes it started still hold the lock; retry when they finish"
    except PermissionError:
        pass
    return f"pid {pid}"


def _busy(out: Path, holder: str, tool: str = TOOL) -> InputError:
    return InputError(f"--out {out} is being written by another {tool} ({holder})")


def survey(out: Path, overwrite: bool, *, locked: bool = False) -> Survey:
    """Classify every entry of ``out`` (read only); raise InputError on a foreign entry, a complete output
    without ``overwrite``, or a folder another pack holds (not probed when ``locked``: this process holds it)."""
    if not out.exists():
        return Survey()
    if not out.is_dir():
        raise InputError(f"--out {out} is a file, expected a folder")
    names = set(os.listdir(out))
    if LOCK in names:
        _check_lock_file(out / LOCK)
        holder = None if locked else lock_holder(out)
        if holder:
            raise _busy(out, holder)
    s = Survey(exists=True)
    if MANIFEST in names:
        s.listed |= _names_in(out / MANIFEST, _load_ours(out / MANIFEST, "manifest"), "manifest")
        s.complete = True
        if not overwrite:
            raise InputError(f"--out {out} already holds a complete pack output ({MANIFEST}); "
                             "pass --overwrite to replace it")
    if MARKER in names:
        s.listed |= _names_in(out / MARKER, _load_ours(out / MARKER, "run marker"), "marker")
    own = s.listed | {MARKER} | ({MANIFEST} if s.complete or MARKER in names else set())
    tmp_re = re.compile(rf"{re.escape(fsutil.TMP_PREFIX)}(?:{'|'.join(map(re.escape, sorted(own)))}){_TMP_SUFFIX}")
    foreign = []
    for name in sorted(names - {MANIFEST, MARKER, LOCK} - ({STAGING} if _is_staging(out / STAGING) else set())):
        if (name in s.listed or tmp_re.fullmatch(name)) and _is_plain_file(out / name):
            s.removable.append(name)
        else:
            foreign.append(name)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise InputError(f"--out {out} holds {out / foreign[0]}{more}, which {TOOL} did not write (neither a {MANIFEST} "
                         f"nor a {MARKER} of its own lists it); nothing was changed: move it away or choose another --out")
    return s


def _is_plain_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _is_staging(path: Path) -> bool:
    """A staging folder of ours: a real folder, empty or holding our ``owner.json``."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        owner = path / _STAGING_OWNER
        return not any(path.iterdir()) or (_is_plain_file(owner) and fsutil.loads_json(owner.read_text()).get("tool") == TOOL)
    except (OSError, ValueError, AttributeError):
        return False


def make_staging(out: Path) -> Path:
    """Under the lock: a fresh, empty ``out/.deepfake-pack-staging`` (an interrupted run's one is removed first)."""
    remove_staging(out)
    path = out / STAGING
    path.mkdir()
    fsutil.atomic_write_json(path / _STAGING_OWNER, {"tool": TOOL})
    return path


def remove_staging(out: Path) -> None:
    if _is_staging(out / STAGING):
        shutil.rmtree(out / STAGING, ignore_errors=True)


def remove_temps(out: Path, names: List[str]) -> int:
    """Remove the temp files of ``names`` (left by a Ray task killed while writing; its retry wrote the shard
    under a new temp name); returns how many. Only called once every writer has finished."""
    tmp_re = re.compile(rf"{re.escape(fsutil.TMP_PREFIX)}(?:{'|'.join(map(re.escape, sorted(names)))}){_TMP_SUFFIX}")
    gone = 0
    for name in os.listdir(out):
        if tmp_re.fullmatch(name) and _is_plain_file(out / name):
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
                gone += 1
    return gone


def _check_lock_file(path: Path) -> None:
    try:
        ok = _is_plain_file(path) and _LOCK_TEXT.fullmatch(path.read_bytes()[:200].decode("ascii")) is not None
    except (OSError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise InputError(f"{path} is not a {TOOL} lock file; refusing to touch this folder: "
                         "move it away or choose another --out")


def prepare(out: Path, s: Survey, planned: List[str]) -> None:
    """Under the lock, before the first shard: record what this run may leave (marker), then remove the
    previous output's files (the manifest first, so an interruption leaves a folder that reads as incomplete)."""
    outputs = sorted(s.listed | set(planned))
    fsutil.atomic_write_json(out / MARKER, {"tool": TOOL, "run_id": uuid.uuid4().hex, "pid": os.getpid(),
                                            "outputs": outputs, "temp_files": f"{fsutil.TMP_PREFIX}<output name>.*"})
    if s.complete:
        (out / MANIFEST).unlink()
        logger.info("%s: replacing the complete output (--overwrite): removing its %d shard/index files",
                    out, len(s.removable))
    elif s.removable:
        logger.info("%s: incomplete output, rebuilding (removing %d files of the interrupted run)", out, len(s.removable))
    for name in s.removable:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()


def finish(out: Path) -> None:
    """After ``manifest.json`` is in place: the marker is no longer needed."""
    with contextlib.suppress(FileNotFoundError):
        (out / MARKER).unlink()


class OutputLock:
    """``with OutputLock(out):`` creates ``out`` if needed and holds an exclusive, non-blocking ``flock`` on
    ``out/.deepfake-pack.lock`` (forked workers inherit it, so it stays held while any of them can still write).
    On exit the lock file is removed, and so are the folders this lock created if they are still empty.
    ``name`` and ``tool`` lock a folder of another tool (deepfake-train's run folder)."""

    def __init__(self, out: Path, *, name: str = LOCK, tool: str = TOOL):
        self.out, self.path, self.fd, self.created, self.tool = Path(out), Path(out) / name, -1, [], tool

    def __enter__(self) -> "OutputLock":
        p = self.out
        while not p.exists() and p != p.parent:
            self.created.append(p)
            p = p.parent
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self._acquire()
        except BaseException:
            self._remove_created()
            raise
        return self

    def _acquire(self) -> None:
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_text(fd)
                os.close(fd)
                raise _busy(self.out, holder, self.tool) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:  # else its holder removed it between our open and our lock: lock the new one
                os.ftruncate(fd, 0)
                os.write(fd, f"{self.tool} pid {os.getpid()}\n".encode())
                self.fd = fd
                return
            os.close(fd)
        raise InputError(f"--out {self.out}: could not take {self.path} (other runs keep replacing it)")

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still holding it: see _acquire
        os.close(self.fd)
        self._remove_created()

    def _remove_created(self) -> None:
        for d in self.created:  # deepest first; stop at the first that is not empty (or not ours to remove)
            try:
                d.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break
