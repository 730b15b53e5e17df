"""deepfake-faces: photos and videos → face crops in folders (the face stage of ``deepfake-pack --faces``, on its own).

    deepfake-faces ../shared/data/ffpp-dev --out faces/ffpp --frames 32 --preview

Runs exactly the stage the packer runs (`shard_tools.media.stage`: same frames, detector, crop and JPEG
quality for the same flags), one process per file, and writes, under ``--out``:

* ``crops/<input>/<file>/f<frame>_<face>.jpg``: the crops (``<input>`` is the input's folder or file name,
  ``<file>`` the file's path below it without its extension);
* ``faces.jsonl``: one line per crop (``file``: its path relative to ``--out``, ``source``, and the face metadata:
  kind, frame, time, box, score, index, square crop);
* ``skipped.jsonl``: one line per file without a crop, with its reason;
* with ``--preview``: ``preview/<input>/<file>.jpg``, the sampled frames side by side with the kept face boxes
  (green) and their square crops (blue) drawn, so you can see what the detector did before packing;
* ``settings.json``: the stage's settings. Every file is written atomically.

``--out`` must be new or empty (or a previous output of this tool with ``--overwrite``) and apart from the
inputs. ``--ray`` runs the files as Ray tasks (the same files come out). Exit codes: 0 at least one crop; 1 none,
or the Ray cluster failed; 2 bad flag, missing input, unusable ``--out`` or Ray not installed.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: repo root on sys.path, this file's folder off it
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import functools
import json
import logging
import multiprocessing
import shutil
from pathlib import Path
from typing import List, Optional

from tqdm import tqdm

from shard_tools import fsutil
from shard_tools.imageio import BadImage
from shard_tools.inputs import InputError, check_apart, normalized_root, walk_folder
from shard_tools.media.cli import add_face_args, settings_from_args
from shard_tools.media.detect import DetectorMissing, check_detector
from shard_tools.media.preview import contact_sheet
from shard_tools.media.stage import FaceSettings, extract
from shard_tools.media.video import BadMedia
from shard_tools.pools import ClusterError, RayMissing, check_address, open_pool

logger = logging.getLogger("shard_tools.faces")
SETTINGS = "settings.json"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepfake-faces", description=__doc__.split("\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="photos, videos and folders of them (walked recursively; "
                                                             "content decides photo vs video)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder (new or empty, or an earlier output with --overwrite)")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier deepfake-faces output in --out")
    g.add_argument("--preview", action="store_true", help="also write each file's sampled frames with the boxes drawn")
    g.add_argument("--workers", type=int, default=max(1, min(8, multiprocessing.cpu_count())),
                   help="processes, one file each at a time")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run one Ray task per file (pip install -e '.[ray]'): no ADDRESS starts a local Ray with --workers "
                        "CPUs; 'auto', HOST:PORT or ray://HOST:PORT joins a cluster whose nodes all see the inputs and "
                        "--out at the same paths. Write --ray=ADDRESS (or --ray after the paths)")
    add_face_args(p)
    return p


def _inputs(paths: List[str]) -> List[tuple]:
    """``(input name, relative path, path)`` per file; InputError for a missing path."""
    out = []
    for raw in paths:
        p = normalized_root("PATH", raw)
        name = Path(p).name or "input"
        if os.path.isdir(p):
            out += [(name, c.rel, c.path) for c in walk_folder(p, 0) if not hasattr(c, "reason")]
        elif os.path.exists(p):
            out.append(("", Path(p).name, p))
        else:
            raise InputError(f"{raw}: no such file or folder")
    return out


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.is_file():
        raise InputError(f"--out {out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / SETTINGS).is_file():
            raise InputError(f"--out {out}: not empty and not a deepfake-faces output; choose a new or empty folder")
        if not overwrite:
            raise InputError(f"--out {out}: already holds a deepfake-faces output; add --overwrite to replace it")
        for name in ("crops", "preview"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("faces.jsonl", "skipped.jsonl", SETTINGS):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _one(task, settings: dict, out: str, preview: bool):
    """Pool entry point: ``(records, skip or None)``; crops (and the preview) are written here."""
    name, rel, path = task
    stem = os.path.join(name, os.path.splitext(rel)[0])
    frames: list = []
    keep = (lambda frame, faces: frames.append((frame, faces))) if preview else None
    try:
        res = extract(path, FaceSettings(**settings), on_frame=keep)
    except (BadMedia, BadImage) as e:
        return [], {"source": os.path.join(name, rel), "reason": e.reason, "detail": e.detail}
    except OSError as e:
        return [], {"source": os.path.join(name, rel), "reason": "unreadable", "detail": str(e.strerror or e)}
    records = []
    for crop in res.crops:
        rel_crop = os.path.join("crops", stem, f"f{crop.meta['frame']:06d}_{crop.meta['index']}.jpg")
        fsutil.atomic_write_bytes(Path(out) / rel_crop, crop.data)
        records.append({**crop.meta, "file": rel_crop, "source": os.path.join(name, rel)})
    if preview and frames:
        fsutil.atomic_write_bytes(Path(out) / "preview" / (stem + ".jpg"), contact_sheet(frames, FaceSettings(**settings)))
    return records, None


def run(args: argparse.Namespace) -> int:
    out = Path(normalized_root("--out", args.out))
    inputs = _inputs(args.paths)
    check_apart(out, [("PATH", p) for p in args.paths if os.path.isdir(p)])
    _prepare_out(out, args.overwrite)
    settings = settings_from_args(args)
    fsutil.atomic_write_json(out / SETTINGS, settings.to_dict())
    fn = functools.partial(_one, settings=settings.to_dict(), out=str(out), preview=args.preview)
    workers = min(args.workers, max(1, len(inputs)))
    records, skips = [], []
    with open_pool(workers, args.ray) as pool:
        for recs, skip in tqdm(pool.imap(fn, inputs), total=len(inputs), desc="faces", unit="file", dynamic_ncols=True):
            records += recs
            skips += [skip] if skip else []
    fsutil.atomic_write_text(out / "faces.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    fsutil.atomic_write_text(out / "skipped.jsonl", "".join(json.dumps(s, sort_keys=True) + "\n" for s in skips))
    for s in skips:
        logger.warning("skipped %s: %s: %s", s["source"], s["reason"], s["detail"])
    logger.info("%d files: %d crops from %d files, %d skipped -> %s", len(inputs), len(records),
                len({r["source"] for r in records}), len(skips), out)
    return 0 if records else 1


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        settings_from_args(args)
        check_detector(args.detector)
        check_address("--ray", args.ray)
    except (ValueError, DetectorMissing) as e:
        parser.error(str(e))
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        return run(args)
    except (InputError, RayMissing) as e:
        logger.error("error: %s", e)
        return 2
    except ClusterError as e:
        logger.error("error: %s", e)
        return 1
    except OSError as e:
        logger.error("error: cannot write %s: %s", e.filename or args.out, e.strerror or e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
