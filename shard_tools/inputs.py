"""Collect the packer's input files: labelled folders (walked recursively) and ``image,label`` CSV files.

Walk rules: entries are visited in sorted name order (deterministic whatever the file system returns);
symlinks to folders are followed once (a loop is skipped as ``symlink-loop``); names starting with ``.``
(``.DS_Store``, ``._x.jpg``, ``.ipynb_checkpoints/``) are skipped as ``hidden``; every other entry that is
not a folder becomes a candidate whatever its extension (content decides later); the pack output folder
itself is never walked.

CSV rules: columns ``image,label`` (an optional header row is recognised), ``image`` relative to
``--images-root``, labels ``REAL``/``FAKE`` in any case or ``0``/``1``. Malformed rows are skipped as
``bad-csv-row`` naming ``FILE:LINE``.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from shard_tools.format import CLASS_NAMES

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


@dataclass(frozen=True)
class Skip:
    """A skipped input: ``label`` is ``real``/``fake``, or None for a CSV row without a valid label."""

    path: str
    label: Optional[str]
    reason: str
    detail: str

    def to_dict(self) -> dict:
        return {"path": self.path, "label": self.label, "reason": self.reason, "detail": self.detail}


def walk_folder(root: str, label: int, exclude: Optional[Path] = None) -> Iterator[Candidate | Skip]:
    """Yield a Candidate per file under ``root`` (sorted, recursive) and a Skip per hidden entry or loop."""
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


def read_csv(csv_path: str, images_root: str) -> List[Candidate | Skip]:
    """Rows of ``image,label`` → Candidates under ``images_root`` (missing files are found by the inspector)."""
    path = Path(csv_path)
    if not path.is_file():
        raise InputError(f"--csv {csv_path}: no such file")
    if not Path(images_root).is_dir():
        raise InputError(f"--images-root {images_root}: no such folder")
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"--csv {csv_path}: cannot read it as UTF-8 CSV ({e})") from None
    out: List[Candidate | Skip] = []
    for lineno, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if lineno == 1 and [c.lower() for c in cells] == ["image", "label"]:
            continue
        where = f"{csv_path}:{lineno}"
        if len(cells) != 2 or not cells[0]:
            out.append(Skip(where, None, "bad-csv-row", f"expected 2 columns image,label, got {row!r}"))
            continue
        image, label_text = cells
        label = _LABELS.get(label_text.lower())
        if label is None:
            out.append(Skip(where, None, "bad-csv-row", f"label {label_text!r} is not REAL/FAKE/0/1"))
            continue
        out.append(Candidate(label, images_root, image, os.path.join(images_root, image)))
    return out


def collect(
    real: List[str], fake: List[str], csv_path: Optional[str], images_root: Optional[str], exclude: Optional[Path]
) -> Tuple[List[Candidate], List[Skip]]:
    """All inputs in a deterministic order (folders as given, then the CSV rows)."""
    cands: List[Candidate] = []
    skips: List[Skip] = []
    items: List[Candidate | Skip] = []
    for label, roots in ((0, real), (1, fake)):
        for root in roots:
            items.extend(walk_folder(root, label, exclude))
    if csv_path is not None:
        items.extend(read_csv(csv_path, images_root if images_root is not None else str(Path(csv_path).parent)))
    for item in items:
        (cands if isinstance(item, Candidate) else skips).append(item)
    return cands, skips
