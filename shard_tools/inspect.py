"""deepfake-inspect: summarise a pack output; ``--verify`` re-reads every shard; ``--grid`` draws samples.

``--verify`` checks, against ``manifest.json``: each shard exists with the listed size and sha256, its
``.idx`` exists and lists the same number of samples, every sample has ``cls``, one image and ``json``
members, ``cls`` equals the json label, the key is the sha256 prefix, original bytes still hash to the
json sha256, every image decodes, per-shard and per-split sample and class counts match, and no key
appears twice or in both splits. Exit codes: 0 ok, 1 verification found problems (each one listed),
2 missing folder/manifest or bad flag.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: repo root on sys.path, this file's folder off it (else shard_tools/
    _here = os.path.dirname(os.path.abspath(__file__))  # inspect.py would shadow the stdlib's inspect, and so on)
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

from pathlib import Path

import argparse
import hashlib
import json
import logging
import random
import tarfile
from collections import Counter, defaultdict
from typing import Dict, Iterator, List, Optional, Tuple

from PIL import Image, ImageDraw
from tqdm import tqdm

from shard_tools import fsutil
from shard_tools.format import CLASS_NAMES, IMAGE_EXTS, MANIFEST, is_remote
from shard_tools.imageio import BadImage, inspect_bytes, load_rgb
from shard_tools.storage import parse_storage_options

logger = logging.getLogger(__name__)
_MAX_PROBLEMS_SHOWN = 50


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepfake-inspect", description=__doc__.split("\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Exit codes: 0 ok; 1 --verify found problems; 2 missing folder/manifest or bad flag.")
    p.add_argument("out", metavar="OUT", help="pack output folder (with manifest.json), or its URL (s3://bucket/prefix, "
                   "https://host/path, any fsspec URL; --verify/--grid download the shards to a temp folder)")
    p.add_argument("--storage-options", default=None, metavar="JSON", help="for a URL: JSON of fsspec filesystem "
                   "arguments, e.g. '{\"endpoint_url\": \"http://host:9000\"}', plus connect_timeout, read_timeout, attempts")
    g = p.add_argument_group("checks")
    g.add_argument("--verify", action="store_true", help="re-read every shard and check it against the manifest")
    g = p.add_argument_group("contact sheet")
    g.add_argument("--grid", default=None, metavar="PNG", help="write a contact sheet of random samples to this PNG")
    g.add_argument("--n", type=int, default=64, help="number of samples on the contact sheet")
    g.add_argument("--thumb", type=int, default=128, help="thumbnail side in pixels")
    g.add_argument("--seed", type=int, default=0, help="seed for choosing the contact sheet samples")
    return p


def iter_samples(tar_path: Path) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` per sample, grouping consecutive members by key (as webdataset does)."""
    key, members = None, {}
    with tarfile.open(tar_path, "r") as tar:
        for m in tar:
            if not m.isfile():
                continue
            k, _, ext = m.name.partition(".")
            if k != key and key is not None:
                yield key, members
                members = {}
            key = k
            members[ext] = tar.extractfile(m).read()
    if key is not None:
        yield key, members


def _check_sample(key: str, members: Dict[str, bytes], where: str) -> Tuple[Optional[int], List[str]]:
    problems = []
    images = [e for e in members if e in IMAGE_EXTS]
    missing = [e for e in ("cls", "json") if e not in members]
    if missing or len(images) != 1:
        return None, [f"{where}: sample {key} has members {sorted(members)} (needs cls, json and one of {IMAGE_EXTS})"]
    cls_text = members["cls"].decode("ascii", "replace").strip()
    if cls_text not in ("0", "1"):
        return None, [f"{where}: sample {key}: cls is {cls_text!r}, expected 0 or 1"]
    label = int(cls_text)
    try:
        meta = json.loads(members["json"])
    except ValueError as e:
        return label, [f"{where}: sample {key}: json does not parse ({e})"]
    if meta.get("label") != label:
        problems.append(f"{where}: sample {key}: cls {label} but json label {meta.get('label')!r}")
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


def verify(root: Path, manifest: dict) -> List[str]:
    """Every problem found, one line each (empty list: the output is sound)."""
    problems: List[str] = []
    seen: Dict[str, str] = {}
    total = sum(int(s.get("num_samples", 0)) for s in manifest["splits"].values())
    bar = tqdm(total=total, desc="verify", unit="img", dynamic_ncols=True)
    for split, info in manifest["splits"].items():
        split_classes: Counter = Counter()
        n_split = 0
        for entry in info.get("shards", []):
            tar_path = root / entry["name"]
            if not tar_path.is_file():
                problems.append(f"{tar_path}: shard listed in the manifest is missing")
                continue
            h = hashlib.sha256()
            with open(tar_path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            if tar_path.stat().st_size != entry.get("bytes"):
                problems.append(f"{tar_path}: {tar_path.stat().st_size} bytes, manifest says {entry.get('bytes')}")
            if h.hexdigest() != entry.get("sha256"):
                problems.append(f"{tar_path}: sha256 differs from the manifest (shard changed or corrupt)")
            idx = root / entry.get("index", tar_path.with_suffix(".idx").name)
            if not idx.is_file():
                problems.append(f"{idx}: DALI index is missing")
            else:
                head = idx.read_text().split("\n", 1)[0].split()
                if len(head) != 2 or head[1] != str(entry.get("num_samples")):
                    problems.append(f"{idx}: header {' '.join(head)!r} does not list {entry.get('num_samples')} samples")
            classes: Counter = Counter()
            n = 0
            try:
                for key, members in iter_samples(tar_path):
                    n += 1
                    bar.update(1)
                    label, found = _check_sample(key, members, tar_path.name)
                    problems.extend(found)
                    if label is not None:
                        classes[CLASS_NAMES[label]] += 1
                    if key in seen:
                        problems.append(f"{tar_path.name}: sample {key} also in {seen[key]}")
                    seen[key] = f"{split}:{tar_path.name}"
            except (tarfile.TarError, OSError, EOFError) as e:
                problems.append(f"{tar_path}: cannot read the tar ({type(e).__name__}: {e})")
            if n != entry.get("num_samples"):
                problems.append(f"{tar_path}: {n} samples, manifest says {entry.get('num_samples')}")
            want = {c: int(entry.get("classes", {}).get(c, 0)) for c in CLASS_NAMES}
            if {c: classes[c] for c in CLASS_NAMES} != want:
                problems.append(f"{tar_path}: classes {dict(classes)}, manifest says {want}")
            split_classes.update(classes)
            n_split += n
        if n_split != info.get("num_samples"):
            problems.append(f"split {split}: {n_split} samples in its shards, manifest says {info.get('num_samples')}")
        want = {c: int(info.get("classes", {}).get(c, 0)) for c in CLASS_NAMES}
        if {c: split_classes[c] for c in CLASS_NAMES} != want:
            problems.append(f"split {split}: classes {dict(split_classes)}, manifest says {want}")
    bar.close()
    return problems


def contact_sheet(root: Path, manifest: dict, path: Path, n: int, thumb: int, seed: int) -> int:
    """Draw ``n`` random samples (label + split captions) into ``path``, written atomically; returns count."""
    shards = [(split, e["name"], int(e["num_samples"])) for split, info in manifest["splits"].items()
              for e in info.get("shards", [])]
    flat = [(split, name, i) for split, name, k in shards for i in range(k)]
    chosen = sorted(random.Random(seed).sample(range(len(flat)), min(n, len(flat))))
    want = defaultdict(set)
    for j in chosen:
        split, name, i = flat[j]
        want[(split, name)].add(i)
    tiles = []
    for (split, name), idxs in want.items():
        for i, (key, members) in enumerate(iter_samples(root / name)):
            if i in idxs:
                ext = next(e for e in members if e in IMAGE_EXTS)
                img = Image.fromarray(load_rgb(members[ext])).resize((thumb, thumb), Image.BILINEAR)
                tiles.append((img, f"{CLASS_NAMES[int(members['cls'])]} / {split}"))
    cols = max(1, int(len(tiles) ** 0.5 + 0.999))
    rows = max(1, (len(tiles) + cols - 1) // cols)
    cap = 14
    sheet = Image.new("RGB", (cols * thumb, rows * (thumb + cap)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (img, text) in enumerate(tiles):
        x, y = (k % cols) * thumb, (k // cols) * (thumb + cap)
        sheet.paste(img, (x, y))
        draw.text((x + 2, y + thumb), text, fill="red" if text.startswith("fake") else "blue")
    with fsutil.atomic_open(path, "wb") as f:
        sheet.save(f, format="PNG")
    return len(tiles)


def summary(manifest: dict) -> List[str]:
    lines = [f"{manifest.get('tool')} {manifest.get('version')} (format {manifest.get('format_version')}), "
             f"seed {manifest.get('seed')}, val fraction {manifest.get('val_fraction')}"]
    for split, info in manifest["splits"].items():
        lines.append(f"{split:<6} {info['num_samples']:>8} samples {info.get('classes')} in {len(info.get('shards', []))} shards")
    for name, c in manifest.get("counts", {}).items():
        lines.append(f"{name:<6} found {c.get('found')}, kept {c.get('kept')}, duplicates {c.get('duplicates')}, "
                     f"skipped {c.get('skipped')} {c.get('reasons', {})}")
    lines.append(f"conflicts (bytes under both labels, excluded): {len(manifest.get('conflicts', []))}")
    lines += [f"warning: {w}" for w in manifest.get("warnings", [])]
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.n < 1 or args.thumb < 8:
        parser.error(f"--n must be >= 1 and --thumb >= 8, got {args.n} and {args.thumb}")
    try:
        parse_storage_options(args.storage_options)
    except ValueError as e:
        parser.error(str(e))
    if is_remote(args.out):
        from shard_tools.remote import inspect_url

        return inspect_url(args, inspect_folder)
    return inspect_folder(args, Path(args.out))


def inspect_folder(args: argparse.Namespace, root: Path, shown: Optional[str] = None) -> int:
    """Summary, --verify and --grid of the pack output in the local folder ``root``; messages name it ``shown``."""
    path = root / MANIFEST
    if not path.is_file():
        logger.error("error: %s is missing: %s is not a complete pack output", path, root)
        return 2
    try:
        manifest = json.loads(path.read_text())
        manifest["splits"]
    except (ValueError, KeyError, TypeError) as e:
        logger.error("error: %s is not a deepfake-pack manifest (%s)", path, e)
        return 2
    for line in summary(manifest):
        logger.info(line)
    rc = 0
    if args.verify:
        problems = verify(root, manifest)
        problems = [p.replace(str(root), shown) for p in problems] if shown else problems
        for p in problems[:_MAX_PROBLEMS_SHOWN]:
            logger.error("problem: %s", p)
        if len(problems) > _MAX_PROBLEMS_SHOWN:
            logger.error("... and %d more problems", len(problems) - _MAX_PROBLEMS_SHOWN)
        if problems:
            logger.error("verify: FAILED with %d problem(s) in %s", len(problems), shown or root)
            rc = 1
        else:
            logger.info("verify: OK (%d samples)", sum(s["num_samples"] for s in manifest["splits"].values()))
    if args.grid:
        k = contact_sheet(root, manifest, Path(args.grid), args.n, args.thumb, args.seed)
        logger.info("contact sheet of %d samples written to %s", k, args.grid)
    return rc


if __name__ == "__main__":
    sys.exit(main())
