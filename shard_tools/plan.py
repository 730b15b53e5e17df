"""Decide what goes where, from small per-file records (no image bytes): dedup, split, order, shards.

* Dedup: files with the same sha256 under one label are kept once (the lexicographically first path);
  bytes found under both labels are excluded entirely (``label-conflict``) and listed.
* Split: an image goes to val when ``H(seed, sha256) < val_fraction`` (``H`` uniform in [0, 1) from a
  sha256), so its split depends only on its bytes and the seed: folder order, other files and files
  added later never move it. An item with a ``group`` (``--group-by``, or the face stage: every crop of
  one file shares its file's group) uses ``H(seed, group)`` instead, so a group never spans two splits.
  Each class gets ``val_fraction`` of its images in expectation (stratified
  by construction; the exact count varies by about ``sqrt(n·f·(1-f))``).
* Order: within a split each class is shuffled by ``H(seed, sha256)`` and the classes are merged by
  their fractional position ``(j + 0.5) / n_class``, so any window of consecutive samples carries both
  classes in their overall proportion (±1 sample).
* Shards: ``max(ceil(n / shard_size), min_shards)`` shards (at most one per sample), sizes differing by
  at most one, contiguous runs of the ordered split.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from shard_tools.format import CLASS_NAMES
from shard_tools.imageio import ImageInfo
from shard_tools.jpeg import quality_bucket
from shard_tools.inputs import Candidate, Skip

SPLITS = ("train", "val")
_MAX_HIST_BINS = 100


@dataclass(frozen=True)
class Item:
    """An input that decoded fine: a file, or one face crop of a photo/video (``face`` its metadata, the
    crop's bytes staged at ``data_path``). ``group`` decides the split (empty: the content hash)."""

    cand: Candidate
    info: ImageInfo
    group: str = ""
    face: Optional[dict] = None
    data_path: Optional[str] = None

    @property
    def split_key(self) -> str:
        return self.group or self.info.sha256

    @property
    def key(self) -> str:
        return self.info.sha256[:32]


@dataclass
class Plan:
    splits: Dict[str, List[List[Item]]]  # split -> shards -> items in order
    kept: Dict[str, List[Item]]
    skips: List[Skip] = field(default_factory=list)
    duplicates: List[dict] = field(default_factory=list)
    conflicts: List[dict] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


def unit_hash(seed: int, purpose: str, sha: str) -> float:
    """A number in [0, 1) fixed by (seed, purpose, sha256): the only randomness of the packer."""
    return int(hashlib.sha256(f"{purpose}:{seed}:{sha}".encode()).hexdigest()[:16], 16) / 2.0**64


def dedup(items: List[Item]) -> Tuple[List[Item], List[dict], List[dict], List[Skip]]:
    """Returns (kept, duplicates, conflicts, conflict skips); kept sorted by path."""
    groups: Dict[Tuple[int, str], List[Item]] = defaultdict(list)
    for it in items:
        groups[(it.cand.label, it.info.sha256)].append(it)
    both = {sha for (label, sha) in groups if label == 0 and (1, sha) in groups}
    kept, duplicates, conflicts, skips = [], [], [], []
    for sha in sorted(both):
        paths = {CLASS_NAMES[lab]: sorted(it.cand.path for it in groups[(lab, sha)]) for lab in (0, 1)}
        conflicts.append({"sha256": sha, **paths})
        for lab in (0, 1):
            other = CLASS_NAMES[1 - lab]
            for p in paths[CLASS_NAMES[lab]]:
                skips.append(Skip(p, CLASS_NAMES[lab], "label-conflict", f"same bytes also under {other}: {paths[other][0]}"))
    for (label, sha), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if sha in both:
            continue
        group = sorted(group, key=lambda it: it.cand.path)
        kept.append(group[0])
        if len(group) > 1:
            duplicates.append({"sha256": sha, "label": CLASS_NAMES[label], "kept": group[0].cand.path,
                               "dropped": [it.cand.path for it in group[1:]]})
    kept.sort(key=lambda it: it.cand.path)
    return kept, duplicates, conflicts, skips


def interleave(per_class: List[List[Item]]) -> List[Item]:
    """Merge class lists by fractional position so every window holds both in proportion."""
    keyed = []
    for label, seq in enumerate(per_class):
        n = len(seq)
        keyed.extend(((j + 0.5) / n, label, j, it) for j, it in enumerate(seq))
    keyed.sort(key=lambda t: t[:3])
    return [t[3] for t in keyed]


def shard_sizes(n: int, shard_size: int, min_shards: int) -> List[int]:
    if n == 0:
        return []
    k = min(n, max(math.ceil(n / shard_size), min_shards))
    base, extra = divmod(n, k)
    return [base + 1 if i < extra else base for i in range(k)]


def make_plan(items: List[Item], *, val_fraction: float, seed: int, shard_size: int, min_shards: int) -> Plan:
    kept, duplicates, conflicts, skips = dedup(items)
    by_split: Dict[str, List[List[Item]]] = {s: [[], []] for s in SPLITS}
    for it in kept:
        split = "val" if unit_hash(seed, "split", it.split_key) < val_fraction else "train"
        by_split[split][it.cand.label].append(it)
    plan = Plan(splits={}, kept={}, skips=skips, duplicates=duplicates, conflicts=conflicts)
    for split in SPLITS:
        per_class = [sorted(seq, key=lambda it: (unit_hash(seed, "order", it.info.sha256), it.info.sha256))
                     for seq in by_split[split]]
        ordered = interleave(per_class)
        plan.kept[split] = ordered
        sizes = shard_sizes(len(ordered), shard_size, min_shards)
        if 0 < len(sizes) < min_shards:
            plan.warnings.append(f"{split}: only {len(ordered)} samples, so {len(sizes)} shard(s) < --min-shards {min_shards}")
        if ordered and any(len(seq) == 0 for seq in per_class):
            missing = CLASS_NAMES[[len(seq) for seq in per_class].index(0)]
            plan.warnings.append(f"{split}: no {missing} images at all")
        shards, start = [], 0
        for size in sizes:
            shards.append(ordered[start:start + size])
            start += size
        plan.splits[split] = shards
    return plan


def _size_bin(w: int, h: int) -> str:
    side = min(w, h)
    lo = 2 ** int(math.log2(side))
    return f"{lo}-{2 * lo - 1}px"


def histograms(items: List[Item]) -> Dict[str, dict]:
    """Per class: counts of format, of image size ``WxH`` (100 most common, the rest as ``other``), of the
    shorter side (powers of two) and of the estimated JPEG quality of JPEG sources (nearest 5)."""
    out = {}
    for label, name in enumerate(CLASS_NAMES):
        mine = [it.info for it in items if it.cand.label == label]
        fmt = Counter(i.format for i in mine)
        size = Counter(f"{i.width}x{i.height}" for i in mine)
        top = dict(size.most_common(_MAX_HIST_BINS))
        if len(size) > _MAX_HIST_BINS:
            top["other"] = sum(size.values()) - sum(top.values())
        quality = Counter(quality_bucket(i.jpeg_quality) for i in mine if i.jpeg_quality is not None)
        out[name] = {"format": dict(sorted(fmt.items())), "size": top,
                     "shorter_side": dict(sorted(Counter(_size_bin(i.width, i.height) for i in mine).items())),
                     "jpeg_quality": dict(sorted(quality.items(), key=lambda kv: int(kv[0])))}
    return out


def _tv(a: Dict[str, int], b: Dict[str, int]) -> float:
    na, nb = sum(a.values()), sum(b.values())
    if not na or not nb:
        return 0.0
    return 0.5 * sum(abs(a.get(k, 0) / na - b.get(k, 0) / nb) for k in set(a) | set(b))


def shortcut_warnings(hist: Dict[str, dict], threshold: float = 0.2) -> List[str]:
    """Warn when real and fake differ in format, size or JPEG quality: a detector learns that instead of the fakery."""
    out = []
    for what in ("format", "shorter_side"):
        a, b = hist["real"][what], hist["fake"][what]
        d = _tv(a, b)
        if d > threshold:
            out.append(f"real and fake differ in {what.replace('_', ' ')} (total variation {d:.2f}): "
                       f"real {dict(Counter(a).most_common(3))}, fake {dict(Counter(b).most_common(3))}; "
                       "a detector can learn this shortcut")
    a, b = hist["real"]["size"], hist["fake"]["size"]
    if len(a) <= 20 and len(b) <= 20 and _tv(a, b) > threshold:  # few fixed sizes: compare them exactly
        out.append(f"real and fake differ in image size (total variation {_tv(a, b):.2f}): "
                   f"real {dict(Counter(a).most_common(3))}, fake {dict(Counter(b).most_common(3))}; "
                   "a detector can learn this shortcut")
    a, b = hist["real"].get("jpeg_quality", {}), hist["fake"].get("jpeg_quality", {})
    if _tv(a, b) > threshold:
        out.append(f"real and fake differ in JPEG quality (total variation {_tv(a, b):.2f}): "
                   f"real {dict(Counter(a).most_common(3))}, fake {dict(Counter(b).most_common(3))}; "
                   "a detector can learn the compression instead of the fakery: re-encode both classes "
                   "at one quality (or the same mix of qualities) before packing")
    return out
