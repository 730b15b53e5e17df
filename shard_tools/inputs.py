"""Collect the packer's input files: labelled folders (walked recursively) and ``image,label`` CSV files.

Walk rules: entries are visited in sorted name order (deterministic whatever the file system returns);
symlinks to folders are followed once (a loop is skipped as ``symlink-loop``); names starting with ``.``
(``.DS_Store``, ``._x.jpg``, ``.ipynb_checkpoints/``) are skipped as ``hidden``; every other entry that is
not a folder becomes a candidate whatever its extension (content decides later). A root is stored
absolute and normalised (``faces/real/``, ``./faces/real``, ``faces//real`` and ``/data/faces/real`` run
from ``/data`` all become ``/data/faces/real``), so shard bytes never depend on how a path was spelled.

CSV rules: columns ``image,label`` (an optional header row is recognised), ``image`` relative to
``--images-root``, labels ``REAL``/``FAKE`` in any case or ``0``/``1``. Each line is read on its own
(``\n``, ``\r\n`` or ``\r`` ends it; a quoted field cannot span lines). Malformed rows (wrong column
count, bad label, bad quoting, not UTF-8, NUL) are skipped as ``bad-csv-row``, and rows whose image is an
absolute path or leaves ``--images-root`` through ``..`` as ``outside-root`` (unless
``allow_outside_root``), each naming ``FILE:LINE``. The check is on the path as written: symlinks inside
``--images-root`` are followed, as in folder walks.

Inputs and the output are kept apart (``check_apart``): the pack refuses an ``--out`` that is or is inside
a ``--real``/``--fake`` folder (writing there would change the input tree, and a later walk of it would meet
the shards), and any input folder (``--images-root`` too) inside ``--out``. An ``--out`` inside
``--images-root`` is allowed (``data.csv``, ``images/`` and ``shards/`` in one project folder is common: the
CSV names its files); a CSV row whose file lies inside ``--out`` is skipped as ``bad-csv-row``.

URL inputs (``--real s3://bucket/real``, any fsspec URL with a listing; `walk_url`): the driver only lists the
prefix (recursively, through `shard_tools.storage`), never reads an object: the pool's workers do. Keys are
ordered as the folder walk orders names (component by component), a key with a component starting with ``.``
is skipped as ``hidden`` (once per hidden "folder"), and ``rel`` is the key below the prefix, so an S3 copy of
a folder gives the same candidates, names and order as the folder itself. HTTP(S) has no listing: refused.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from shard_tools.format import CLASS_NAMES
from shard_tools.storage import StorageError, list_tree, protocol_of, redacted

_LABELS = {"real": 0, "0": 0, "fake": 1, "1": 1}


class InputError(RuntimeError):
    """A missing or unusable input (exit code 2); the message names the path."""


@dataclass(frozen=True)
class Candidate:
    """A file to inspect: ``path`` = ``root``/``rel``; ``root`` as given on the command line."""

    label: int
    root: str
    rel: str
    path: str
    group: Optional[str] = None  # the CSV's group column (``--group-by csv:COLUMN``)


@dataclass(frozen=True)
class Skip:
    """A skipped input: ``label`` is ``real``/``fake``, or None for a CSV row without a valid label."""

    path: str
    label: Optional[str]
    reason: str
    detail: str

    def to_dict(self) -> dict:
        return {"path": self.path, "label": self.label, "reason": self.reason, "detail": self.detail}


def normalized_root(flag: str, root: str) -> str:
    """``root`` as an absolute, normalised path (``os.path.normpath``, then ``os.path.abspath``: relative and
    absolute spellings of one folder give the same text); InputError if empty, or if dropping a ``..``
    changes which folder it names (``link/..`` where ``link`` is a symlink)."""
    if not str(root):
        raise InputError(f"{flag} '': empty path")
    norm = os.path.normpath(root)
    if ".." in Path(root).parts and os.path.exists(root) and os.path.exists(norm) and not os.path.samefile(root, norm):
        raise InputError(f"{flag} {root}: its '..' follows a symlink, so it is not the folder {norm}; "
                         "spell the path without '..'")
    return os.path.abspath(norm)


def is_url(path: str) -> bool:
    """An input given as a URL (``s3://...``); ``file://`` counts as a folder once stripped (`normalized_input`)."""
    return "://" in str(path)


def normalized_input(flag: str, root: str) -> str:
    """A ``--real``/``--fake`` value as stored: a URL without its trailing ``/`` (``file://`` stripped to its
    folder), else `normalized_root`."""
    text = str(root)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return text.rstrip("/") if is_url(text) else normalized_root(flag, text)


def _url_error(flag: str, url: str, message: str) -> InputError:
    return InputError(f"{flag} {redacted(url)}: {message}")


def walk_url(url: str, label: int, storage_options: Optional[dict] = None) -> List[Candidate | Skip]:
    """Candidates for every object below the prefix ``url`` (the listing only, no object is read), in the order
    and with the ``rel`` names `walk_folder` gives the same tree on disk; a Skip per hidden key or "folder".
    InputError (one line) when the prefix cannot be listed, holds no object, or cannot be listed at all (HTTP)."""
    flag, name = f"--{CLASS_NAMES[label]}", CLASS_NAMES[label]
    url = url.rstrip("/")
    if protocol_of(url) in ("http", "https"):
        raise _url_error(flag, url, "HTTP(S) has no listing of files: put them under an s3:// prefix (or another "
                                    "listable fsspec URL), or download them and pass a folder or a --csv")
    try:
        found = list_tree(url, storage_options=storage_options)
    except StorageError as e:
        raise _url_error(flag, url, f"cannot list it: {e.message}") from None
    keys = sorted((k for k in found if k), key=lambda k: k.split("/"))
    if not keys:
        what = "is an object, not a prefix of objects" if "" in found else \
            "no object under this prefix (no such bucket/prefix, or it is empty)"
        raise _url_error(flag, url, f"{what}; give the prefix that holds the {name} files")
    out: List[Candidate | Skip] = []
    hidden: set = set()
    root = redacted(url)  # stored in every sample's json: never a password
    for rel in keys:
        parts = rel.split("/")
        dot = next((i for i, part in enumerate(parts) if part.startswith(".")), None)
        if dot is not None:
            top = "/".join(parts[:dot + 1])
            if top not in hidden:
                hidden.add(top)
                out.append(Skip(f"{url}/{top}", name, "hidden", "name starts with '.'"))
            continue
        if "" in parts:  # "a//b.jpg": no folder walk could name it
            out.append(Skip(f"{url}/{rel}", name, "unreadable", "key has an empty path component"))
            continue
        out.append(Candidate(label, root, rel, f"{url}/{rel}"))
    return out


def walk_folder(root: str, label: int, exclude: Optional[Path] = None) -> Iterator[Candidate | Skip]:
    """Yield a Candidate per file under ``root`` (sorted, recursive) and a Skip per hidden entry or loop.

    ``root`` is normalised first (``normalized_root``); ``exclude``, a folder never walked.
    """
    root = normalized_root(f"--{CLASS_NAMES[label]}", root)
    top = Path(root)
    if not top.exists():
        raise InputError(f"--{CLASS_NAMES[label]} {root}: no such folder")
    if not top.is_dir():
        raise InputError(f"--{CLASS_NAMES[label]} {root}: is not a folder")
    name = CLASS_NAMES[label]
    excluded = os.path.realpath(exclude) if exclude is not None else None
    visited: set = set()

    def rec(folder: str, reldir: str) -> Iterator[Candidate | Skip]:
        real = os.path.realpath(folder)
        if real in visited:
            yield Skip(folder, name, "symlink-loop", f"folder already walked as {real}")
            return
        visited.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            yield Skip(folder, name, "unreadable", f"cannot list folder: {e.strerror or e}")
            return
        for entry in entries:
            rel = reldir + entry.name
            if entry.name.startswith("."):
                yield Skip(entry.path, name, "hidden", "name starts with '.'")
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                if excluded is not None and os.path.realpath(entry.path) == excluded:
                    continue
                yield from rec(entry.path, rel + "/")
            else:
                yield Candidate(label, root, rel, entry.path)

    yield from rec(str(top), "")


def _outside(image: str) -> bool:
    return os.path.isabs(image) or os.path.normpath(image).split(os.sep)[0] == ".."


def _parse_line(raw: bytes, lineno: int) -> List[str] | str:
    """The stripped cells of one CSV line, or why it is not a row."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 text (byte {e.start + 1} of the line)"
    if lineno == 1:
        text = text.removeprefix("\ufeff")
    if "\0" in text:
        return "contains a NUL character"
    try:
        row = next(csv.reader([text], strict=True), [])
    except csv.Error as e:
        return f"cannot parse it as CSV ({e}): {text[:80]!r}"
    return [c.strip() for c in row]


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or below it, both with symlinks resolved (``folder`` already resolved)."""
    return os.path.commonpath([os.path.realpath(path), folder]) == folder


def _header(cells: List[str], group_column: Optional[str]) -> Optional[List[str]]:
    """The lower-cased column names when ``cells`` is a header row (``image`` and ``label`` among them)."""
    names = [c.lower() for c in cells]
    if "image" in names and "label" in names and (len(names) == 2 or group_column is not None):
        return names
    return None


def read_csv(csv_path: str, images_root: str, allow_outside_root: bool = False,
             exclude: Optional[Path] = None, group_column: Optional[str] = None) -> List[Candidate | Skip]:
    """Rows of ``image,label`` → Candidates under ``images_root`` (missing files are found by the inspector);
    rows naming a file inside ``exclude`` (the pack output) are skipped. With ``group_column`` the CSV must
    start with a header naming ``image``, ``label`` and that column (more columns are allowed and ignored);
    the column's cell becomes the Candidate's ``group``."""
    if not str(csv_path):
        raise InputError("--csv '': empty path")
    path = Path(csv_path)
    if not path.exists():
        raise InputError(f"--csv {csv_path}: no such file")
    if not path.is_file():
        raise InputError(f"--csv {csv_path}: is not a regular file")
    root = normalized_root("--images-root", images_root)
    if not Path(root).is_dir():
        raise InputError(f"--images-root {images_root}: no such folder")
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise InputError(f"--csv {csv_path}: cannot read it ({e.strerror or e})") from None
    excluded = os.path.realpath(exclude) if exclude is not None else None
    first = _parse_line(lines[0], 1) if lines else []
    header = _header(first, group_column) if isinstance(first, list) else None
    if group_column is not None and (header is None or group_column.lower() not in header):
        raise InputError(f"--csv {csv_path}: --group-by csv:{group_column} needs a header row naming image, label and "
                         f"{group_column}; its first line is {first!r}")
    columns = header or ["image", "label"]
    out: List[Candidate | Skip] = []
    for lineno, raw in enumerate(lines, start=1):
        where = f"{csv_path}:{lineno}"
        cells = _parse_line(raw, lineno)
        if isinstance(cells, str):
            out.append(Skip(where, None, "bad-csv-row", cells))
            continue
        if not any(cells) or (lineno == 1 and header is not None):
            continue
        row = dict(zip(columns, cells))
        if len(cells) != len(columns) or not row["image"]:
            out.append(Skip(where, None, "bad-csv-row", f"expected {len(columns)} columns {','.join(columns)}, "
                                                        f"got {cells!r}"))
            continue
        image, label_text = row["image"], row["label"]
        group = row.get(group_column.lower()) if group_column is not None else None
        label = _LABELS.get(label_text.lower())
        if label is None:
            out.append(Skip(where, None, "bad-csv-row", f"label {label_text!r} is not REAL/FAKE/0/1"))
            continue
        if _outside(image) and not allow_outside_root:
            out.append(Skip(where, CLASS_NAMES[label], "outside-root",
                            f"{image!r} is outside --images-root {root}; pass --allow-outside-root to read it"))
            continue
        rel = os.path.normpath(image)
        if excluded is not None and _inside(os.path.join(root, rel), excluded):
            out.append(Skip(where, CLASS_NAMES[label], "bad-csv-row", f"{image!r} is inside --out {exclude}"))
            continue
        out.append(Candidate(label, root, rel, os.path.join(root, rel), group))
    return out


def check_apart(out: Path, folders: List[Tuple[str, str]], csv_root: Optional[str] = None) -> None:
    """InputError when ``out`` is, or is inside, one of ``folders`` (``(flag, folder)`` pairs), or one of them
    or ``csv_root`` is inside ``out``; compared by real path (symlinks resolved)."""
    o = os.path.realpath(out)
    for flag, folder in folders:
        r = os.path.realpath(folder)
        if os.path.commonpath([o, r]) == r:
            where = "is" if o == r else "is inside"
            raise InputError(f"--out {out} {where} {flag} {folder}: the output must not change an input folder; "
                             "choose an --out outside the inputs")
    for flag, folder in folders + ([("--images-root", csv_root)] if csv_root is not None else []):
        if _inside(folder, o):
            raise InputError(f"{flag} {folder} is inside --out {out}: choose an --out that holds no input")


def collect(
    real: List[str], fake: List[str], csv_path: Optional[str], images_root: Optional[str], exclude: Optional[Path],
    allow_outside_root: bool = False, group_column: Optional[str] = None, storage_options: Optional[dict] = None,
) -> Tuple[List[Candidate], List[Skip]]:
    """All inputs in a deterministic order (folders and URL prefixes as given, then the CSV rows);
    ``storage_options`` for URL inputs."""
    cands: List[Candidate] = []
    skips: List[Skip] = []
    items: List[Candidate | Skip] = []
    for label, roots in ((0, real), (1, fake)):
        for root in roots:
            items.extend(walk_url(root, label, storage_options) if is_url(root) else walk_folder(root, label, exclude))
    if csv_path is not None:
        root = images_root if images_root is not None else str(Path(csv_path).parent)
        items.extend(read_csv(csv_path, root, allow_outside_root, exclude, group_column))
    for item in items:
        (cands if isinstance(item, Candidate) else skips).append(item)
    return cands, skips


def check_apart_urls(out: str, inputs: List[Tuple[str, str]]) -> None:
    """InputError when the URL ``out`` is, or is inside, an input URL prefix, or an input prefix is inside it."""
    def inside(a: str, b: str) -> bool:
        return a == b or a.startswith(b.rstrip("/") + "/")

    o = str(out).rstrip("/")
    for flag, url in inputs:
        if inside(o, url):
            where = "is" if o == url else "is inside"
            raise InputError(f"--out {redacted(o)} {where} {flag} {redacted(url)}: the output must not change an input "
                             "prefix; choose an --out outside the inputs")
        if inside(url, o):
            raise InputError(f"{flag} {redacted(url)} is inside --out {redacted(o)}: choose an --out that holds no "
                             "input")
