"""``deepfake-inspect --verify``: re-read a pack output and check every shard and index against the manifest.

Checks: each shard exists with the listed size and sha256; its ``.idx`` exists, has the ``v1.2 N`` header
``wds2idx`` writes with N the shard's sample count, and each of its lines (``ext offset size name`` per
member of one sample) matches the tar's actual members (data offset, size and name, grouped by sample as
``wds2idx`` groups them), so an index of another shard with the same sample count is caught; every sample
has ``cls``, one image and ``json`` members, ``cls`` equals the json label, the key is the sha256 prefix,
original bytes still hash to the json sha256, every image decodes; per-shard and per-split sample and class
counts match; no key appears twice or in both splits; no sample ``group`` (``--group-by``, face stage) is in both
splits. ``check_manifest`` first rejects a manifest whose
structure the checks could not trust (types, and shard names that are not plain file names in ``OUT``).
"""
from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from tqdm import tqdm

from shard_tools.fsutil import loads_json, sha256_file
from shard_tools.format import CLASS_NAMES, IMAGE_EXTS
from shard_tools.imageio import BadImage, inspect_bytes

_MAX_MEMBER = 512 * 2**20  # larger than any image the packer writes
_INDEX_VERSION = "v1.2"


def iter_samples(tar_path: Path) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` per sample, grouping consecutive members by key (as webdataset does).

    Plain tar only (``r:``: a compressed stream is an error, never decompressed); raises ``tarfile.TarError``
    or ``OSError`` on a damaged archive or a member over 512 MiB.
    """
    key, members = None, {}
    with tarfile.open(tar_path, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            if m.size > _MAX_MEMBER:
                raise tarfile.TarError(f"member {m.name} is {m.size} bytes, more than any packed image")
            k, _, ext = m.name.partition(".")
            if k != key and key is not None:
                yield key, members
                members = {}
            key = k
            members[ext] = tar.extractfile(m).read()
    if key is not None:
        yield key, members


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _counts_ok(d) -> bool:
    return isinstance(d, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in d.values())


def check_manifest(manifest) -> Optional[str]:
    """Why ``manifest`` cannot be trusted by the checks (one line), or None."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        return "no 'splits' object"
    for split, info in manifest["splits"].items():
        where = f"splits.{split}"
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            return f"{where}: no 'shards' list"
        if not isinstance(info.get("num_samples"), int) or not _counts_ok(info.get("classes", {})):
            return f"{where}: 'num_samples' or 'classes' is not a count"
        for i, e in enumerate(info["shards"]):
            if not isinstance(e, dict) or not _plain_name(e.get("name")):
                return f"{where}.shards[{i}]: 'name' {e.get('name') if isinstance(e, dict) else e!r} is not a file name in OUT"
            if "index" in e and not _plain_name(e["index"]):
                return f"{where}.shards[{i}]: 'index' {e['index']!r} is not a file name"
            if not isinstance(e.get("num_samples"), int) or not _counts_ok(e.get("classes", {})):
                return f"{where}.shards[{i}]: 'num_samples' or 'classes' is not a count"
    return None


def _check_sample(key: str, members: Dict[str, bytes], where: str,
                  groups: Optional[Dict[str, str]] = None, split: str = "") -> Tuple[Optional[int], List[str]]:
    """(label, problems) of one sample; ``groups`` (group -> first split seen) catches a group in two splits."""
    problems = []
    images = [e for e in members if e in IMAGE_EXTS]
    missing = [e for e in ("cls", "json") if e not in members]
    if missing or len(images) != 1:
        return None, [f"{where}: sample {key} has members {sorted(members)} (needs cls, json and one of {IMAGE_EXTS})"]
    cls_text = members["cls"].decode("ascii", "replace").strip()
    if cls_text not in ("0", "1"):
        return None, [f"{where}: sample {key}: cls is {cls_text[:20]!r}, expected 0 or 1"]
    label = int(cls_text)
    try:
        meta = loads_json(members["json"])
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except ValueError as e:
        return label, [f"{where}: sample {key}: json does not parse as an object ({e})"]
    if meta.get("label") != label:
        problems.append(f"{where}: sample {key}: cls {label} but json label {meta.get('label')!r}")
    group = meta.get("group")
    if groups is not None and isinstance(group, str):
        first = groups.setdefault(group, split)
        if first != split:
            problems.append(f"{where}: sample {key}: group {group!r} is in split {split} and in {first} "
                            "(frames or files of one group leak across the split)")
    sha = str(meta.get("sha256", ""))
    if not sha.startswith(key):
        problems.append(f"{where}: sample {key}: key is not the prefix of json sha256 {sha[:32]}")
    data = members[images[0]]
    if meta.get("normalized") is None and hashlib.sha256(data).hexdigest() != sha:
        problems.append(f"{where}: sample {key}: image bytes do not hash to json sha256 (original bytes changed)")
    try:
        info = inspect_bytes(data, min_size=1, max_pixels=2**62)
        if (info.width, info.height) != (meta.get("width"), meta.get("height")):
            problems.append(f"{where}: sample {key}: image is {info.width}x{info.height}, json says "
                            f"{meta.get('width')}x{meta.get('height')}")
    except BadImage as e:
        problems.append(f"{where}: sample {key}: image does not decode ({e})")
    return label, problems


def expected_index(tar_path: Path) -> List[List[str]]:
    """Per sample, the ``ext offset size name`` groups ``wds2idx`` writes for ``tar_path``'s members
    (regular files; the sample is the name up to the first '.' after the last '/'). Raises like ``iter_samples``."""
    lines: List[List[str]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tar:
        for m in tar:
            if m.type != tarfile.REGTYPE and not (m.type == tarfile.AREGTYPE and m.isfile()):
                continue
            dot = m.name.find(".", m.name.rfind("/") + 1)
            base, ext = m.name[:dot], m.name[dot + 1:]  # no dot: wds2idx's own slicing, kept as it is
            if not base or base.endswith("/"):
                continue
            group = [ext, str(m.offset_data), str(m.size), m.name]
            if base != last:
                lines.append(group)
                last = base
            else:
                lines[-1].extend(group)
    return lines


def check_index(idx: Path, tar_path: Path, num_samples) -> List[str]:
    """Problems of ``idx`` against the manifest's sample count and the tar's members."""
    try:
        text = idx.read_bytes().decode("ascii")
    except UnicodeDecodeError:
        return [f"{idx}: not a DALI index (not ASCII text)"]
    except OSError as e:
        return [f"{idx}: cannot read it ({e.strerror or e})"]
    head, *body = text.split("\n")
    body = [line.split() for line in body if line.strip()]
    parts = head.split()
    if len(parts) != 2 or parts[0] != _INDEX_VERSION or parts[1] != str(num_samples):
        return [f"{idx}: header {head[:40]!r} is not '{_INDEX_VERSION} {num_samples}' ({num_samples} samples)"]
    if len(body) != num_samples:
        return [f"{idx}: {len(body)} sample lines, its header says {num_samples}"]
    try:
        want = expected_index(tar_path)
    except (tarfile.TarError, OSError, EOFError):
        return []  # the tar itself is reported as unreadable
    bad = [i for i, (got, exp) in enumerate(zip(body, want)) if got != exp]
    if len(want) != len(body):
        return [f"{idx}: lists {len(body)} samples, {tar_path.name} holds {len(want)}"]
    if bad:
        i = bad[0]
        got, exp = body[i], want[i]
        k = next((k for k in range(0, max(len(got), len(exp)), 4) if got[k:k + 4] != exp[k:k + 4]), 0)
        return [f"{idx}: {len(bad)} of {len(body)} sample lines do not match the members of {tar_path.name} "
                f"(line {i + 2}: index has {' '.join(got[k:k + 4])!r}, the tar {' '.join(exp[k:k + 4])!r}); "
                "rebuild it with wds2idx or re-pack"]
    return []



def verify_shard(root: Path, entry: dict, split: str, seen: Dict[str, str], bar,
                 groups: Optional[Dict[str, str]] = None) -> Tuple[int, Counter, List[str]]:
    """(samples read, classes, problems) of one manifest shard entry; ``seen`` maps keys to where they were met,
    ``groups`` each sample group to the split it was first met in."""
    tar_path = root / entry["name"]
    if not tar_path.is_file():
        return 0, Counter(), [f"{tar_path}: shard listed in the manifest is missing"]
    problems = []
    if tar_path.stat().st_size != entry.get("bytes"):
        problems.append(f"{tar_path}: {tar_path.stat().st_size} bytes, manifest says {entry.get('bytes')}")
    if sha256_file(tar_path) != entry.get("sha256"):
        problems.append(f"{tar_path}: sha256 differs from the manifest (shard changed or corrupt)")
    idx = root / entry.get("index", tar_path.with_suffix(".idx").name)
    if not idx.is_file():
        problems.append(f"{idx}: DALI index is missing")
    else:
        problems += check_index(idx, tar_path, entry["num_samples"])
    classes: Counter = Counter()
    n = 0
    try:
        for key, members in iter_samples(tar_path):
            n += 1
            bar.update(1)
            label, found = _check_sample(key, members, tar_path.name, groups, split)
            problems.extend(found)
            if label is not None:
                classes[CLASS_NAMES[label]] += 1
            if key in seen:
                problems.append(f"{tar_path.name}: sample {key} also in {seen[key]}")
            seen[key] = f"{split}:{tar_path.name}"
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{tar_path}: cannot read the tar ({type(e).__name__}: {e})")
    if n != entry["num_samples"]:
        problems.append(f"{tar_path}: {n} samples, manifest says {entry['num_samples']}")
    want = {c: entry.get("classes", {}).get(c, 0) for c in CLASS_NAMES}
    if {c: classes[c] for c in CLASS_NAMES} != want:
        problems.append(f"{tar_path}: classes {dict(classes)}, manifest says {want}")
    return n, classes, problems


def verify(root: Path, manifest: dict) -> List[str]:
    """Every problem found, one line each (empty list: the output is sound). ``manifest`` must pass
    ``check_manifest``."""
    problems: List[str] = []
    seen: Dict[str, str] = {}
    groups: Dict[str, str] = {}
    total = sum(s["num_samples"] for s in manifest["splits"].values())
    bar = tqdm(total=total, desc="verify", unit="img", dynamic_ncols=True)
    for split, info in manifest["splits"].items():
        split_classes: Counter = Counter()
        n_split = 0
        for entry in info["shards"]:
            n, classes, found = verify_shard(root, entry, split, seen, bar, groups)
            problems += found
            split_classes.update(classes)
            n_split += n
        if n_split != info["num_samples"]:
            problems.append(f"split {split}: {n_split} samples in its shards, manifest says {info['num_samples']}")
        want = {c: info.get("classes", {}).get(c, 0) for c in CLASS_NAMES}
        if {c: split_classes[c] for c in CLASS_NAMES} != want:
            problems.append(f"split {split}: classes {dict(split_classes)}, manifest says {want}")
    bar.close()
    return problems
