"""Which inputs must land in one split: a group name per file, decided once, by the pack's driver.

Rules (``--group-by``):

* ``file`` (default): each source file is its own group, named by its content hash (so every crop of a
  video or photo shares one split, and renaming or moving a file never moves it); for plain images this is
  exactly the packer's content-hash split.
* ``ffpp``: FaceForensics++ names. A file's identities are the all-digit ``_``-separated parts of its
  name without extension (``044.mp4`` → {044}; ``Deepfakes_044_945.mp4`` → {044, 945}; a method prefix
  such as ``Deepfakes``/``Face2Face``/``FaceSwap``/``NeuralTextures`` is not an identity). Files sharing an
  identity are joined, transitively (``A_B`` joins A and B, so ``A.mp4``, ``B.mp4``, ``X_A_B.mp4`` and
  ``Y_B_C.mp4`` are one group); the group is named by its smallest identity. A name with no digit part is its
  own identity (its stem).
* ``regex:PATTERN``: the first capture group (or the whole match) of ``re.search(PATTERN, relative path)``;
  a file it does not match is skipped as ``no-group`` (a rule that misses files is a mistake to fix, not to
  guess around).
* ``csv:COLUMN``: the named column of the ``--csv`` input (its header names the columns); an empty cell is
  skipped as ``no-group``.

A group's split is drawn from (seed, group name), so adding files never moves an existing group unless it
joins two groups (``ffpp``).
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

RULES = ("file", "ffpp", "regex:PATTERN", "csv:COLUMN")


def parse_rule(rule: str) -> Tuple[str, Optional[str]]:
    """``(kind, argument)``; ValueError naming ``--group-by`` for anything else."""
    if rule in ("file", "ffpp"):
        return rule, None
    kind, sep, arg = rule.partition(":")
    if sep and kind == "regex" and arg:
        try:
            re.compile(arg)
        except re.error as e:
            raise ValueError(f"--group-by regex:{arg}: not a valid regular expression ({e})") from None
        return kind, arg
    if sep and kind == "csv" and arg:
        return kind, arg
    raise ValueError(f"--group-by {rule!r}: expected one of {', '.join(RULES)}")


def ffpp_identities(rel: str) -> List[str]:
    stem = os.path.splitext(os.path.basename(rel))[0]
    ids = [part for part in stem.split("_") if part.isdigit()]
    return ids or [stem]


def ffpp_groups(rels: Sequence[str]) -> List[str]:
    """The ``ffpp`` group of each relative path (union of identities that share a file)."""
    parent: Dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    per_file = [ffpp_identities(r) for r in rels]
    for ids in per_file:
        for other in ids[1:]:
            a, b = find(ids[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
        find(ids[0])
    smallest: Dict[str, str] = {}
    for x in list(parent):
        root = find(x)
        smallest[root] = min(smallest.get(root, x), x)
    return [f"ffpp:{smallest[find(ids[0])]}" for ids in per_file]


def regex_group(pattern: str, rel: str) -> Optional[str]:
    m = re.search(pattern, rel)
    if m is None:
        return None
    return f"re:{m.group(1) if m.groups() else m.group(0)}"
