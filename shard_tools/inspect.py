"""deepfake-inspect: summarise a pack output; ``--verify`` re-reads every shard; ``--grid`` draws samples.

``--verify`` checks every shard and its ``.idx`` against ``manifest.json`` (``shard_tools.verify`` lists
the checks; an index that does not match its tar's members is caught). ``--grid`` writes a contact sheet
of random samples to a ``.png`` path (never onto the manifest or a file it lists, nor onto an existing
file that is not a PNG); a sample that cannot be drawn (damaged shard, undecodable image) is skipped and
counted with its reason. Exit codes: 0 ok, 1 verification found problems or the contact sheet had to skip
samples (each one listed), 2 missing folder/manifest, a manifest that is not a deepfake-pack manifest,
or a bad flag.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: repo root on sys.path, this file's folder off it (else shard_tools/
    _here = os.path.dirname(os.path.abspath(__file__))  # inspect.py would shadow the stdlib's inspect, and so on)
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

from pathlib import Path

import argparse
import logging
import random
import tarfile
from collections import defaultdict
from typing import List, Optional, Tuple

from PIL import Image, ImageDraw

from shard_tools import fsutil
from shard_tools.format import CLASS_NAMES, IMAGE_EXTS, MANIFEST, is_remote
from shard_tools.imageio import BadImage, load_rgb
from shard_tools.storage import parse_storage_options
from shard_tools.verify import check_manifest, iter_samples, verify

logger = logging.getLogger(__name__)
_MAX_PROBLEMS_SHOWN = 50
_MAX_N, _MAX_THUMB = 4096, 1024
__all__ = ["contact_sheet", "get_args_parser", "iter_samples", "main", "summary", "verify"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepfake-inspect", description=__doc__.split("\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Exit codes: 0 ok; 1 --verify found problems or --grid skipped samples; 2 missing folder/manifest, "
                                       "not a deepfake-pack manifest, or bad flag.")
    p.add_argument("out", metavar="OUT", help="pack output folder (with manifest.json), or its URL (s3://bucket/prefix, "
                   "https://host/path, any fsspec URL; --verify/--grid download the shards to a temp folder)")
    p.add_argument("--storage-options", default=None, metavar="JSON", help="for a URL: JSON of fsspec filesystem "
                   "arguments, e.g. '{\"endpoint_url\": \"http://host:9000\"}', plus connect_timeout, read_timeout, attempts")
    g = p.add_argument_group("checks")
    g.add_argument("--verify", action="store_true", help="re-read every shard and check it against the manifest")
    g = p.add_argument_group("contact sheet")
    g.add_argument("--grid", default=None, metavar="PNG", help="write a contact sheet of random samples to this .png file")
    g.add_argument("--n", type=int, default=64, help=f"number of samples on the contact sheet (1-{_MAX_N})")
    g.add_argument("--thumb", type=int, default=128, help=f"thumbnail side in pixels (8-{_MAX_THUMB})")
    g.add_argument("--seed", type=int, default=0, help="seed for choosing the contact sheet samples")
    return p


def _tile(members: dict, thumb: int) -> Tuple[Image.Image, int]:
    """Thumbnail and label of one sample; raises BadImage, ValueError or KeyError on a bad sample."""
    ext = next((e for e in members if e in IMAGE_EXTS), None)
    if ext is None:
        raise KeyError(f"no image member among {sorted(members)}")
    label = int(members["cls"])
    if label not in (0, 1):
        raise ValueError(f"cls {label} is not 0 or 1")
    return Image.fromarray(load_rgb(members[ext])).resize((thumb, thumb), Image.BILINEAR), label


def _draw_tiles(root: Path, want: dict, thumb: int) -> Tuple[list, List[str]]:
    """(tiles, skipped): each skipped sample or unreadable shard named with its reason."""
    tiles, skipped = [], []
    for (split, name), idxs in want.items():
        found = set()
        try:
            for i, (key, members) in enumerate(iter_samples(root / name)):
                if i not in idxs:
                    continue
                found.add(i)
                try:
                    img, label = _tile(members, thumb)
                except (BadImage, ValueError, KeyError) as e:
                    skipped.append(f"{name}: sample {key}: {type(e).__name__ if not str(e) else e}")
                    continue
                tiles.append((img, f"{CLASS_NAMES[label]} / {split}"))
        except (tarfile.TarError, OSError, EOFError) as e:
            skipped.append(f"{root / name}: cannot read the tar ({type(e).__name__}: {e})")
        lost = len(idxs - found)
        if lost and not (skipped and skipped[-1].startswith(str(root / name))):
            skipped.append(f"{root / name}: {lost} chosen sample(s) are not in the shard (fewer than the manifest says)")
    return tiles, skipped


def contact_sheet(root: Path, manifest: dict, path: Path, n: int, thumb: int, seed: int) -> Tuple[int, List[str]]:
    """Draw ``n`` random samples (label + split captions) into ``path``, written atomically (not written when
    no sample could be drawn); returns (samples drawn, one line per skipped sample or unreadable shard)."""
    shards = [(split, e["name"], e["num_samples"]) for split, info in manifest["splits"].items()
              for e in info["shards"]]
    flat = [(split, name, i) for split, name, k in shards for i in range(max(0, k))]
    chosen = sorted(random.Random(seed).sample(range(len(flat)), min(n, len(flat))))
    want = defaultdict(set)
    for j in chosen:
        split, name, i = flat[j]
        want[(split, name)].add(i)
    tiles, skipped = _draw_tiles(root, want, thumb)
    if not tiles:
        return 0, skipped
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
    return len(tiles), skipped


def grid_path_problem(grid: Path, root: Path, manifest: dict) -> Optional[str]:
    """Why ``--grid`` must not be written there (one line), or None."""
    ours = {MANIFEST} | {n for info in manifest["splits"].values() for e in info["shards"]
                         for n in (e["name"], e.get("index", ""))}
    if grid.resolve().parent == root.resolve() and grid.name in ours:
        return f"--grid {grid} would overwrite the pack output's own {grid.name}"
    if grid.suffix.lower() != ".png":
        return f"--grid {grid}: expected a .png file name"
    if grid.is_dir():
        return f"--grid {grid} is a folder"
    if grid.exists():
        try:
            with open(grid, "rb") as f:
                magic = f.read(8)
        except OSError as e:
            return f"--grid {grid}: cannot read the existing file ({e.strerror or e})"
        if magic != b"\x89PNG\r\n\x1a\n":
            return f"--grid {grid} exists and is not a PNG: refusing to overwrite it"
    return None


def summary(manifest: dict) -> List[str]:
    """The manifest in a few lines (``manifest`` has passed ``check_manifest``; other fields may be anything)."""
    lines = [f"{manifest.get('tool')} {manifest.get('version')} (format {manifest.get('format_version')}), "
             f"seed {manifest.get('seed')}, val fraction {manifest.get('val_fraction')}"]
    for split, info in manifest["splits"].items():
        lines.append(f"{split:<6} {info['num_samples']:>8} samples {info.get('classes')} in {len(info['shards'])} shards")
    counts = manifest.get("counts")
    for name, c in (counts.items() if isinstance(counts, dict) else []):
        c = c if isinstance(c, dict) else {}
        lines.append(f"{name:<6} found {c.get('found')}, kept {c.get('kept')}, duplicates {c.get('duplicates')}, "
                     f"skipped {c.get('skipped')} {c.get('reasons', {})}")
    conflicts = manifest.get("conflicts")
    lines.append(f"conflicts (bytes under both labels, excluded): {len(conflicts) if isinstance(conflicts, list) else 0}")
    warnings = manifest.get("warnings")
    lines += [f"warning: {w}" for w in (warnings if isinstance(warnings, list) else [])]
    return lines


def load_manifest(root: Path) -> Tuple[Optional[dict], Optional[str]]:
    """(manifest, None), or (None, the one-line error)."""
    path = root / MANIFEST
    if not path.is_file():
        return None, f"{path} is missing: {root} is not a complete pack output"
    try:
        manifest = fsutil.loads_json(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        return None, f"{path} is not a deepfake-pack manifest ({type(e).__name__}: {e})"
    why = check_manifest(manifest)
    if why:
        return None, f"{path} is not a deepfake-pack manifest ({why})"
    return manifest, None


def _run_verify(root: Path, manifest: dict, shown: Optional[str] = None) -> int:
    problems = verify(root, manifest)
    problems = [p.replace(str(root), shown) for p in problems] if shown else problems
    for p in problems[:_MAX_PROBLEMS_SHOWN]:
        logger.error("problem: %s", p)
    if len(problems) > _MAX_PROBLEMS_SHOWN:
        logger.error("... and %d more problems", len(problems) - _MAX_PROBLEMS_SHOWN)
    if problems:
        logger.error("verify: FAILED with %d problem(s) in %s", len(problems), shown or root)
        return 1
    n = sum(s["num_samples"] for s in manifest["splits"].values())
    if shown:  # what was read is a fresh download, not any copy that train/evaluate keep
        logger.info("verify: OK (%d samples, downloaded from %s just now; a --cache-dir of train or evaluate was "
                    "not read: their --verify-data re-hashes the cached copies)", n, shown)
    else:
        logger.info("verify: OK (%d samples)", n)
    return 0


def _run_grid(root: Path, manifest: dict, args: argparse.Namespace) -> int:
    try:
        k, skipped = contact_sheet(root, manifest, Path(args.grid), args.n, args.thumb, args.seed)
    except OSError as e:
        where = f"{e.filename}: " if e.filename and str(e.filename) != str(args.grid) else ""
        logger.error("error: cannot write --grid %s: %s%s", args.grid, where, e.strerror or e)
        return 2
    for line in skipped[:_MAX_PROBLEMS_SHOWN]:
        logger.warning("grid: skipped %s", line)
    if k:
        logger.info("contact sheet of %d samples written to %s", k, args.grid)
    if skipped:
        logger.error("error: --grid: %d sample(s) or shard(s) could not be drawn, e.g. %s; %s; run --verify",
                     len(skipped), skipped[0], f"{k} drawn" if k else "nothing written")
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.n <= _MAX_N:
        parser.error(f"--n must be in [1, {_MAX_N}], got {args.n}")
    if not 8 <= args.thumb <= _MAX_THUMB:
        parser.error(f"--thumb must be in [8, {_MAX_THUMB}], got {args.thumb}")
    try:
        parse_storage_options(args.storage_options)
    except ValueError as e:
        parser.error(str(e))
    if is_remote(args.out):
        from shard_tools.remote import inspect_url

        return inspect_url(args, inspect_folder)
    return inspect_folder(args, Path(args.out))


def inspect_folder(args: argparse.Namespace, root: Path, shown: Optional[str] = None) -> int:
    """Summary, --verify and --grid of the pack output in the local folder ``root``; messages name it
    ``shown`` (the URL it was downloaded from) when given."""
    manifest, error = load_manifest(root)
    if error is None and args.grid:
        error = grid_path_problem(Path(args.grid), root, manifest)
    if error:
        logger.error("error: %s", error.replace(str(root), shown) if shown else error)
        return 2
    for line in summary(manifest):
        logger.info(line)
    rc = _run_verify(root, manifest, shown) if args.verify else 0
    if args.grid:
        rc = max(rc, _run_grid(root, manifest, args))
    return rc


if __name__ == "__main__":
    sys.exit(main())
