"""deepfake-pack: real/fake image folders (or an image,label CSV) → validated, deduplicated WebDataset shards.

Three phases, memory flat in the bytes packed:
1. inspect: ``--workers`` processes read, sha256 and fully decode every file (``shard_tools.imageio``:
   its docstring has the accepted formats, the keep-bytes/re-encode policy and the skip reasons) and
   return small records, no image bytes;
2. plan: dedup, leak-free split, class interleaving, shard sizes (``shard_tools.plan``);
3. write: each shard is written by a worker (``shard_tools.writer``) under a ``.tmp-*`` name then
   renamed, with its DALI ``.idx``; ``manifest.json`` last, atomically.

Output folder (``shard_tools.outdir``): the pack only ever removes files it can prove it wrote (listed in
its ``manifest.json`` or its run marker, or their temp files); any other entry in ``--out`` makes it refuse,
naming the entry. A complete output (with ``manifest.json``) is only replaced with ``--overwrite``; an
interrupted run's files are removed and the output rebuilt. An exclusive lock in ``--out`` is held for the
whole run: a second pack on the same folder fails at once. ``--out`` must not be inside an input folder,
nor an input folder inside it. Input roots are normalised, so the bytes do not depend on their spelling.
Same inputs and seed → byte-identical shards, also after a SIGKILL and rerun.

``--ray [ADDRESS]``: phases 1 and 3 run as Ray tasks (``shard_tools.pools``) instead of local processes; phase 2,
the manifest and every rule stay here, in the driver, so the bytes are the same.
Exit codes: 0 ok, 1 the Ray cluster failed, 2 missing input / bad flag / nothing packed / ``--strict`` with skips /
existing or foreign output / output being written by another pack / ``--ray`` without Ray installed.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: repo root on sys.path, this file's folder off it (else shard_tools/
    _here = os.path.dirname(os.path.abspath(__file__))  # inspect.py would shadow the stdlib's inspect, and so on)
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

from pathlib import Path

import argparse
import functools
import logging
import contextlib
import multiprocessing
import time
from collections import Counter
from typing import List, Optional

from tqdm import tqdm

from shard_tools import fsutil, outdir
from shard_tools.format import CLASS_NAMES, MANIFEST, is_remote
from shard_tools.imageio import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE, BadImage, inspect_bytes, read_source
from shard_tools.inputs import (InputError, Skip, check_apart, check_apart_urls, collect, is_url, normalized_input,
                                normalized_root)
from shard_tools.media.cli import add_face_args, settings_from_args
from shard_tools.media.detect import DetectorMissing, check_detector
from shard_tools.media.groups import RULES, parse_rule
from shard_tools.media.packing import assign_groups, count_lines, extract_all, group_report, staging_area
from shard_tools.media.probe import video_container
from shard_tools.plan import SPLITS, Item, Plan, histograms, make_plan, shortcut_warnings
from shard_tools.pools import ClusterError, RayMissing, check_address, open_pool
from shard_tools.storage import StorageError, option_names, parse_storage_options, redacted, remove_pack
from shard_tools.writer import ChangedInput, write_shard_task

logger = logging.getLogger(__name__)
TOOL, VERSION, FORMAT_VERSION = outdir.TOOL, "0.1.0", 1
_ROWS_SHOWN = 20  # skipped CSV rows named in the log (all of them are in the manifest)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=TOOL, description=__doc__.split("\n")[0].split(": ", 1)[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Accepted images: JPEG, PNG, WebP, BMP, MPO, TIFF, AVIF (HEIC with a Pillow plugin) by content "
               "(not extension). Kept as original bytes when 8-bit RGB/grayscale JPEG/PNG/WebP without EXIF "
               "rotation (an MPO: its first JPEG image), else stored as a lossless PNG of the upright RGB pixels "
               "(CMYK, 16-bit, alpha dropped, palette, BMP, TIFF, AVIF, EXIF-rotated). Skipped with a "
               "reason: zero-byte, not-an-image, unsupported-format (GIF, ICO, DNG, ...), animated, truncated, "
               "corrupt, unsupported-mode, too-small, too-large, unreadable, broken-symlink, not-a-file, "
               "missing, hidden, symlink-loop, bad-csv-row, outside-root, label-conflict, video-needs-faces (a video without "
               "--faces); with --faces also no-face, unreadable-video, no-video-stream, no-frames, truncated, too-long, "
               "wrong-extension; with --group-by regex:/csv: also no-group. Exact duplicates "
               "within a class are kept once and counted. --out may hold only this tool's own files. Exit "
               "codes: 0 ok; 2 missing input, bad flag, nothing packed, --strict with any skip, a complete "
               "output without --overwrite, a file in --out this tool did not write, --out inside an input "
               "(or an input inside --out), or --out being written by another deepfake-pack, or --ray without Ray "
               "installed; 1 the Ray cluster failed (a task's worker died more than 3 times, or no cluster at ADDRESS).")
    g = p.add_argument_group("data")
    g.add_argument("--real", nargs="+", default=[], metavar="DIR", help="folder(s) of real images (label 0), walked "
                   "recursively, or URL prefix(es) (s3://bucket/real): listed here, each object read by a worker")
    g.add_argument("--fake", nargs="+", default=[], metavar="DIR", help="as --real, for fake images (label 1)")
    g.add_argument("--csv", default=None, metavar="FILE", help="CSV with rows image,label (REAL/FAKE any case, or 0/1; optional header)")
    g.add_argument("--images-root", default=None, metavar="DIR", help="folder the CSV image paths are relative to (None: the CSV's folder)")
    g.add_argument("--allow-outside-root", action="store_true",
                   help="read CSV rows whose image is an absolute path or leaves --images-root via '..' (else skipped as outside-root)")
    g.add_argument("--min-size", type=int, default=DEFAULT_MIN_SIZE, help="skip images whose shorter side is below this (too-small)")
    g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="skip images with more pixels than this (too-large; decompression bombs)")
    g.add_argument("--faces", action="store_true",
                   help="run the face stage: photos and videos (mp4, mov, m4v, mkv, webm, avi; by content) become square "
                        "face crops, one sample per face (see the face stage flags); without it videos are skipped as "
                        "video-needs-faces")
    g = p.add_argument_group("split and shards")
    g.add_argument("--val-fraction", type=float, default=0.2, help="fraction of each class in val, in [0, 1), decided by content hash and seed")
    g.add_argument("--seed", type=int, default=0, help="seed of the split and of the sample order")
    g.add_argument("--group-by", default="file", metavar="RULE",
                   help=f"what must share a split ({', '.join(RULES)}): file = each source file (all crops of a video "
                        "together); ffpp = FaceForensics++ identities (A_B.mp4 joins A and B); regex:PATTERN = its first "
                        "group on the relative path; csv:COLUMN = that column of --csv")
    g.add_argument("--shard-size", type=int, default=1000, help="target samples per shard")
    g.add_argument("--min-shards", type=int, default=8, help="at least this many shards per split where there are enough samples (warns otherwise)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="OUT",
                   help="output folder (shards, .idx files, manifest.json): new, empty, or an earlier output of this "
                        "tool; or a URL (s3://bucket/prefix, any fsspec URL): packed in a temp folder, then uploaded, "
                        "manifest last")
    g.add_argument("--storage-options", default=None, metavar="JSON", help="for a URL --out and URL inputs: JSON of "
                   "fsspec filesystem arguments, e.g. '{\"endpoint_url\": \"http://host:9000\"}', plus connect_timeout, read_timeout, attempts")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a complete output (one with manifest.json): removes only the files its manifest lists")
    g.add_argument("--strict", action="store_true", help="fail (exit 2) before writing anything if any input is skipped")
    g.add_argument("--workers", type=int, default=max(1, min(8, multiprocessing.cpu_count())), help="processes that read, hash, decode and write")
    g = p.add_argument_group("cluster")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the per-file work and the shard writing as Ray tasks (pip install -e '.[ray]'): no ADDRESS "
                        "starts a local Ray with --workers CPUs for this run; 'auto', HOST:PORT or ray://HOST:PORT joins "
                        "a running cluster, whose nodes must all see the inputs and a folder --out at the same paths "
                        "(or use --out s3://...). Same bytes as without it")
    add_face_args(p)
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0.0 <= args.val_fraction < 1.0:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    for flag in ("shard_size", "min_shards", "workers", "min_size", "max_pixels"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not (args.real or args.fake or args.csv):
        p.error("give at least one input: --real DIR, --fake DIR or --csv FILE")
    if args.images_root and not args.csv:
        p.error("--images-root needs --csv")
    try:
        if parse_storage_options(args.storage_options) and not any(map(is_url, [args.out, *args.real, *args.fake])):
            p.error("--storage-options is for a URL --out or URL inputs (s3://bucket/prefix, ...), got only folders")
    except ValueError as e:
        p.error(str(e))
    if args.allow_outside_root and not args.csv:
        p.error("--allow-outside-root needs --csv")
    try:
        check_address("--ray", args.ray)
        kind, _ = parse_rule(args.group_by)
        args.face_settings = settings_from_args(args)
        if args.faces:
            check_detector(args.detector)
    except (ValueError, DetectorMissing) as e:
        p.error(str(e))
    if kind == "csv" and not args.csv:
        p.error(f"--group-by {args.group_by} needs --csv")


def _face_settings(args: argparse.Namespace):
    from dataclasses import replace

    return replace(args.face_settings, max_pixels=args.max_pixels)


def _inspect(path: str, min_size: int, max_pixels: int, storage_options: Optional[dict] = None):
    """Pool entry point: the ImageInfo of the file or object at ``path`` (read here, in the worker), or BadImage."""
    data = b""
    try:
        data = read_source(path, storage_options=storage_options)
        return inspect_bytes(data, min_size=min_size, max_pixels=max_pixels)
    except BadImage as e:
        if e.reason in ("not-an-image", "unsupported-format") and video_container(data[:64]):
            return BadImage("video-needs-faces", "a video: pass --faces to sample its frames and crop the faces")
        return e


def _summary(counts: dict, skips: List[Skip]) -> List[str]:
    reasons = sorted({s.reason for s in skips})
    head = f"{'class':<8}{'found':>8}{'kept':>8}{'dups':>8}{'skipped':>9}" + "".join(f"{r:>16}" for r in reasons)
    lines = [head]
    for name in (*CLASS_NAMES, None):
        by = Counter(s.reason for s in skips if s.label == name)
        if name is None:
            if not by:
                continue
            c = {"found": sum(by.values()), "kept": 0, "duplicates": 0, "skipped": sum(by.values())}
        else:
            c = counts[name]
        lines.append(f"{name or 'no-label':<8}{c['found']:>8}{c['kept']:>8}{c['duplicates']:>8}{c['skipped']:>9}"
                     + "".join(f"{by.get(r, 0):>16}" for r in reasons))
    return lines


def _normalize_paths(args: argparse.Namespace) -> None:
    """Input and output paths through ``os.path.normpath`` (manifest and shards never depend on the spelling)."""
    args.real = [normalized_input("--real", r) for r in args.real]
    args.fake = [normalized_input("--fake", r) for r in args.fake]
    args.out = normalized_root("--out", args.out)
    if args.csv is not None:
        args.csv = normalized_root("--csv", args.csv)
        args.images_root = normalized_root("--images-root", args.images_root or str(Path(args.csv).parent))


def _check_layout(args: argparse.Namespace) -> Path:
    """Fail before anything is written: --out apart from the inputs, and holding nothing that is not ours."""
    out = Path(args.out)
    folders = [("--real", r) for r in args.real] + [("--fake", f) for f in args.fake]
    check_apart(out, [(flag, f) for flag, f in folders if os.path.isdir(f)],
                args.images_root if args.csv is not None and os.path.isdir(args.images_root) else None)
    outdir.survey(out, args.overwrite)
    return out


def _inspect_all(args: argparse.Namespace, cands, pool, workers: int) -> List[Item | Skip]:
    fn = functools.partial(_inspect, min_size=args.min_size, max_pixels=args.max_pixels,
                           storage_options=args._input_options)
    paths = [c.path for c in cands]
    chunk = max(1, min(64, len(paths) // (workers * 16) or 1))
    results = pool.imap(fn, paths, chunksize=chunk)
    out: List[Item | Skip] = []
    for cand, res in tqdm(zip(cands, results), total=len(cands), desc="inspect", unit="img", dynamic_ncols=True):
        if isinstance(res, BadImage):
            out.append(Skip(cand.path, CLASS_NAMES[cand.label], res.reason, res.detail))
        else:
            out.append(Item(cand, res))
    return out


def _write_all(args: argparse.Namespace, out: Path, plan: Plan, n_kept: int, pool) -> dict:
    """Every shard, written by the pool's workers: into ``out``, or (``--ray --out URL``) straight to the URL."""
    remote = getattr(args, "_remote", None)  # (url, storage options): set by shard_tools.remote for --ray
    tasks = [(remote[0] if remote else out, f"{split}-{i:06d}.tar", shard, args.max_pixels, remote and remote[1],
              args._input_options)
             for split in SPLITS for i, shard in enumerate(plan.splits[split])]
    planned = [name for _, tar, *_ in tasks for name in (tar, tar[:-4] + ".idx")]
    state = outdir.survey(out, args.overwrite, locked=True)  # re-checked just before anything is replaced
    outdir.prepare(out, state, planned)
    if remote:  # the old manifest goes before the first new shard lands: the prefix reads as incomplete
        remove_pack(remote[0], [MANIFEST], storage_options=remote[1])
    entries = {}
    bar = tqdm(total=n_kept, desc="write", unit="img", dynamic_ncols=True)
    for entry in pool.imap_unordered(write_shard_task, tasks):
        entries[entry["name"]] = entry
        bar.update(entry["num_samples"])
    bar.close()
    if pool.distributed and outdir.remove_temps(out, planned):  # a killed, retried writer's temp file
        logger.info("removed temp files of shard writers that were killed and retried")
    return entries


def run(args: argparse.Namespace) -> int:
    if str(args.out).startswith("file://"):  # a local folder: its flock and ownership rules apply
        args.out = str(args.out)[len("file://"):]
    if not hasattr(args, "_input_options"):  # URL inputs: the workers read them with these (kept for pack_to_url's run)
        args._input_options = parse_storage_options(args.storage_options) or None
        urls = [(flag, normalized_input(flag, u)) for flag, us in (("--real", args.real), ("--fake", args.fake))
                for u in us if is_url(u)]
        if urls and is_remote(str(args.out)):
            check_apart_urls(str(args.out), urls)
    if is_remote(str(args.out)):
        from shard_tools.remote import pack_to_url

        return pack_to_url(args, run)
    _normalize_paths(args)
    out = _check_layout(args)
    t0 = time.time()
    with outdir.OutputLock(out):
        kind, column = parse_rule(args.group_by)
        cands, skips = collect(args.real, args.fake, args.csv, args.images_root, out, args.allow_outside_root,
                               column if kind == "csv" else None, args._input_options)
        logger.info("found %d candidate files (%d skipped while walking)", len(cands), len(skips))
        workers = min(args.workers, max(1, len(cands)))
        face_counts, remote = None, getattr(args, "_remote", None)
        # the pool is closed (nothing still running) before the staged crops are removed
        with (staging_area(out, bool(args.ray), remote) if args.faces else contextlib.nullcontext()) as staging, \
                open_pool(workers, args.ray) as pool:
            if args.faces:
                items, more, face_counts = extract_all(cands, _face_settings(args), staging, pool, remote and remote[1],
                                                       args._input_options)
                skips += more
            else:
                results = _inspect_all(args, cands, pool, workers)
                items = [r for r in results if isinstance(r, Item)]
                skips += [r for r in results if isinstance(r, Skip)]
            items, more = assign_groups(items, args.group_by)
            skips += more
            t_inspect = time.time() - t0
            plan = make_plan(items, val_fraction=args.val_fraction, seed=args.seed, shard_size=args.shard_size,
                             min_shards=args.min_shards)
            skips.extend(plan.skips)
            n_kept = sum(len(v) for v in plan.kept.values())
            if n_kept == 0:
                raise InputError(f"nothing to pack: {len(cands)} candidate files, none usable "
                                 f"({dict(Counter(s.reason for s in skips))})")
            if args.strict and skips:
                s = skips[0]
                raise InputError(f"--strict: {len(skips)} input(s) skipped, e.g. {redacted(s.path)}: {s.reason}: "
                                 f"{s.detail}")
            entries = _write_all(args, out, plan, n_kept, pool)
            logger.info("inspect %.1fs, write %.1fs", t_inspect, time.time() - t0 - t_inspect)
        manifest = build_manifest(args, plan, entries, skips, face_counts)
        fsutil.atomic_write_json(out / MANIFEST, manifest)
        outdir.finish(out)
    _report(manifest, skips, n_kept, len(entries), len(cands), out, time.time() - t0)
    return 0


def _report(manifest: dict, skips: List[Skip], n_kept: int, n_shards: int, n_cands: int, out: Path, dt: float) -> None:
    for line in _summary(manifest["counts"], skips):
        logger.info(line)
    if "faces" in manifest:
        for line in count_lines(manifest["faces"]["counts"], skips):
            logger.info(line)
    rows = [s for s in skips if s.reason in ("bad-csv-row", "outside-root")]  # each names FILE:LINE
    for s in rows[:_ROWS_SHOWN]:
        logger.warning("skipped %s: %s: %s", s.path, s.reason, s.detail)
    if len(rows) > _ROWS_SHOWN:
        logger.warning("... and %d more CSV rows skipped (all in %s 'skipped')", len(rows) - _ROWS_SHOWN, MANIFEST)
    for w in manifest["warnings"]:
        logger.warning("warning: %s", w)
    logger.info("packed %d samples (train %d, val %d; groups %d / %d) into %d shards in %s in %.1fs (%.0f %s/s)",
                n_kept, manifest["splits"]["train"]["num_samples"], manifest["splits"]["val"]["num_samples"],
                manifest["groups"]["train"], manifest["groups"]["val"], n_shards, out, dt, n_cands / max(dt, 1e-9),
                "file" if "faces" in manifest else "img")


def _redacted(obj):
    """``obj`` (JSON-like) with every URL's password replaced by ``***`` (`storage.redacted`): URL inputs name
    their objects in skips and duplicates."""
    if isinstance(obj, str):
        return redacted(obj) if "://" in obj else obj
    if isinstance(obj, list):
        return [_redacted(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _redacted(v) for k, v in obj.items()}
    return obj


def build_manifest(args: argparse.Namespace, plan, entries: dict, skips: List[Skip],
                   face_counts: Optional[dict] = None) -> dict:
    kept_all = [it for split in SPLITS for it in plan.kept[split]]
    splits = {}
    for split in SPLITS:
        shards = [entries[f"{split}-{i:06d}.tar"] for i in range(len(plan.splits[split]))]
        splits[split] = {"num_samples": sum(s["num_samples"] for s in shards),
                         "classes": {c: sum(s["classes"][c] for s in shards) for c in CLASS_NAMES}, "shards": shards}
    counts = {}
    for label, name in enumerate(CLASS_NAMES):
        mine = [s for s in skips if s.label == name]
        dups = sum(len(d["dropped"]) for d in plan.duplicates if d["label"] == name)
        kept = sum(1 for it in kept_all if it.cand.label == label)
        counts[name] = {"found": kept + len(mine) + dups, "kept": kept, "skipped": len(mine), "duplicates": dups,
                        "reasons": dict(sorted(Counter(s.reason for s in mine).items()))}
    hist = histograms(kept_all)
    extra = {}
    if face_counts is not None:
        extra["faces"] = {"settings": _face_settings(args).to_dict(), "counts": face_counts}
    return {
        "tool": TOOL, "version": VERSION, "format_version": FORMAT_VERSION,
        "args": {k: (str(v) if isinstance(v, Path) else option_names(v) if k == "storage_options"
                     else _redacted(v) if k in ("real", "fake") else v)
                 for k, v in sorted(vars(args).items())
                 if k != "face_settings" and not k.startswith("_")},  # option names only: values may be secrets
        "seed": args.seed, "val_fraction": args.val_fraction, "classes": {n: i for i, n in enumerate(CLASS_NAMES)},
        "splits": splits,
        "inputs": {"real": _redacted(args.real), "fake": _redacted(args.fake), "csv": args.csv,
                   "images_root": args.images_root},
        "counts": counts,
        "skipped": _redacted([s.to_dict() for s in skips]),
        "duplicates": _redacted(plan.duplicates),
        "conflicts": _redacted(plan.conflicts),
        "histograms": hist,
        "warnings": plan.warnings + shortcut_warnings(hist),
        "groups": group_report(plan.kept, args.group_by),
        **extra,
    }


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = get_args_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        return run(args)
    except (InputError, ChangedInput, StorageError, RayMissing) as e:
        logger.error("error: %s", e)
        return 2
    except ClusterError as e:
        logger.error("error: %s", e)
        return 1
    except OSError as e:  # the output side: disk full, read-only folder, ...
        logger.error("error: cannot write %s: %s", e.filename or args.out, e.strerror or e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
