"""The packer's face phase and its group rule: files → face-crop Items (bytes staged on disk), groups → Items.

Phase 1 of ``deepfake-pack --faces``: ``--workers`` processes each take one source file, hash it, run the face
stage (`shard_tools.media.stage.extract`) and write its crops into a staging folder named by their SHA-256
(identical crops share a file); the driver gets small records back (no image bytes), exactly like the plain
image phase, and the usual plan (dedup by crop content, split by group, interleave) and writer follow.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from tqdm import tqdm

from shard_tools import outdir
from shard_tools.format import CLASS_NAMES, is_remote
from shard_tools.fsutil import sha256_file
from shard_tools.imageio import BadImage, inspect_bytes, unreadable_object
from shard_tools.inputs import Candidate, Skip
from shard_tools.media.groups import ffpp_groups, parse_rule, regex_group
from shard_tools.media.stage import FaceSettings, extract
from shard_tools.media.video import BadMedia
from shard_tools.plan import Item
from shard_tools.storage import StorageError, join, list_names, local_copy, remove_pack, write_bytes

_COUNTS = ("files", "photos", "videos", "frames", "faces_found", "crops")


def _extract_one(path: str, settings: dict, staging: str, storage_options: Optional[dict] = None,
                 input_options: Optional[dict] = None):
    """Pool entry point: ``("ok", kind, frames, faces_found, [(staged path, ImageInfo, meta)])`` or
    ``("skip", reason, detail)``. ``staging`` is a folder, or a URL (``--ray --out s3://...``); ``path`` a file,
    or a URL input, downloaded here (the worker) into a temp file for the face stage (``input_options``)."""
    local = path
    try:
        with local_copy(path, storage_options=input_options) as local:
            source_sha = sha256_file(local)
            res = extract(local, FaceSettings(**settings))
    except (BadMedia, BadImage) as e:
        return "skip", e.reason, e.detail.replace(local, path)  # names the object, not its deleted temp copy
    except StorageError as e:
        bad = unreadable_object(e)
        return "skip", bad.reason, bad.detail
    except OSError as e:
        return "skip", "unreadable", f"cannot read it ({e.strerror or e})"
    out = []
    for crop in res.crops:
        staged = join(staging, f"{crop.sha256[:32]}.jpg")
        if is_remote(staging):
            write_bytes(staged, crop.data, storage_options=storage_options)  # same name, same bytes: idempotent
        elif not os.path.exists(staged):
            tmp = f"{staged}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(crop.data)
            os.replace(tmp, staged)
        out.append((staged, inspect_bytes(crop.data), {**crop.meta, "source_sha256": source_sha}))
    return "ok", res.kind, res.frames, res.faces_found, out


def extract_all(cands: Sequence[Candidate], settings: FaceSettings, staging: str, pool,
                storage_options: Optional[dict] = None, input_options: Optional[dict] = None
                ) -> Tuple[List[Item], List[Skip], Dict[str, dict]]:
    """Items (one per crop, ``group`` = ``file:<source sha256>``), skips (one per file) and per-class counts.
    ``pool``: a `shard_tools.pools` pool; ``staging`` must be readable wherever the shard writers run;
    ``storage_options`` for a URL staging, ``input_options`` for URL inputs."""
    fn = functools.partial(_extract_one, settings=settings.to_dict(), staging=str(staging),
                           storage_options=storage_options, input_options=input_options)
    results = pool.imap(fn, [c.path for c in cands], chunksize=1)
    items: List[Item] = []
    skips: List[Skip] = []
    counts = {name: Counter({k: 0 for k in _COUNTS}) for name in CLASS_NAMES}
    for cand, res in tqdm(zip(cands, results), total=len(cands), desc="faces", unit="file", dynamic_ncols=True):
        name = CLASS_NAMES[cand.label]
        counts[name]["files"] += 1
        if res[0] == "skip":
            skips.append(Skip(cand.path, name, res[1], res[2]))
            continue
        _, kind, frames, found, crops = res
        counts[name][kind + "s"] += 1
        counts[name]["frames"] += frames
        counts[name]["faces_found"] += found
        counts[name]["crops"] += len(crops)
        for staged, info, meta in crops:
            items.append(Item(cand, info, group=f"file:{meta['source_sha256']}", face=meta, data_path=staged))
    return items, skips, {name: dict(c) for name, c in counts.items()}


@contextlib.contextmanager
def staging_area(out: Path, distributed: bool, remote: Optional[tuple] = None) -> Iterator[str]:
    """Where the face crops wait between extraction and shard writing, removed afterwards: a temp folder on one
    machine; with Ray, where every node can read it: ``OUT/.deepfake-pack-staging`` (``--out`` is a folder every
    node mounts), or ``URL/.deepfake-pack-staging/`` for ``remote = (url, storage_options)``."""
    if not distributed:
        path = tempfile.mkdtemp(prefix="deepfake-pack-faces-")
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
        return
    if remote is None:
        try:
            yield str(outdir.make_staging(out))
        finally:
            outdir.remove_staging(out)
        return
    url, opts = join(remote[0], outdir.STAGING), remote[1]
    remove_pack(url, list_names(url, storage_options=opts), storage_options=opts)  # an interrupted run's crops
    try:
        yield url
    finally:
        remove_pack(url, list_names(url, storage_options=opts), storage_options=opts)


def assign_groups(items: List[Item], rule: str) -> Tuple[List[Item], List[Skip]]:
    """Items with their ``--group-by`` group (``file`` keeps what they have), and ``no-group`` skips."""
    kind, arg = parse_rule(rule)
    if kind == "file":
        return items, []
    if kind == "ffpp":
        rels = sorted({it.cand.rel for it in items})
        by_rel = dict(zip(rels, ffpp_groups(rels)))
        return [_with_group(it, by_rel[it.cand.rel]) for it in items], []
    kept, skips, missed = [], [], set()
    for it in items:
        group = regex_group(arg, it.cand.rel) if kind == "regex" else (f"csv:{it.cand.group}" if it.cand.group else None)
        if group is not None:
            kept.append(_with_group(it, group))
        elif it.cand.path not in missed:
            missed.add(it.cand.path)
            what = f"regex {arg!r} does not match {it.cand.rel!r}" if kind == "regex" else f"empty {arg} cell"
            skips.append(Skip(it.cand.path, CLASS_NAMES[it.cand.label], "no-group", what))
    return kept, skips


def _with_group(it: Item, group: str) -> Item:
    return Item(it.cand, it.info, group=group, face=it.face, data_path=it.data_path)


def group_report(kept: Dict[str, List[Item]], rule: str, limit: int = 10_000) -> dict:
    """The manifest's ``groups``: the rule, groups per split, and their names where there are at most ``limit``."""
    per_split = {split: sorted({it.split_key for it in seq}) for split, seq in kept.items()}
    out: dict = {"rule": rule, **{split: len(names) for split, names in per_split.items()}}
    if all(len(names) <= limit for names in per_split.values()) and rule != "file":
        out["names"] = per_split
    shared = set.intersection(*(set(v) for v in per_split.values())) if per_split else set()
    assert not shared, f"groups in two splits: {sorted(shared)[:3]}"  # the plan splits by group
    return out


def count_lines(counts: Dict[str, dict], skips: List[Skip]) -> List[str]:
    """The face stage's summary table, per class."""
    reasons = defaultdict(Counter)
    for s in skips:
        reasons[s.label][s.reason] += 1
    lines = [f"{'faces':<8}" + "".join(f"{k:>12}" for k in _COUNTS) + "   skipped"]
    for name in CLASS_NAMES:
        c = counts[name]
        lines.append(f"{name:<8}" + "".join(f"{c[k]:>12}" for k in _COUNTS) + f"   {dict(reasons[name]) or ''}")
    return lines
