"""deepfake-sbi-sheet: a contact sheet of self-blended pseudo-fakes beside their sources and masks.

    deepfake-sbi-sheet --data shards/faces --out runs/sbi_sheet.png --n 12
    deepfake-sbi-sheet --images photos/real --out sheet.png

Each row: the real source | its pseudo-fake (`pipeline.augment.self_blend`, what ``--self-blend``
trains on) | the blend mask | the absolute difference, amplified. Use it to see what the model is
taught before a long run. Exit codes: 0 ok, 2 bad flag or no readable real image.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: repo root on sys.path, this file's folder off it (else shard_tools/
    _here = os.path.dirname(os.path.abspath(__file__))  # inspect.py would shadow the stdlib's inspect, and so on)
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import logging
from typing import List, Optional

import numpy as np
from PIL import Image

from pipeline.augment.config import SBI_MASKS
from pipeline.augment.face_mask import face_box_in_crop
from pipeline.augment.self_blend import contact_sheet, self_blend
from pipeline.data.folders import collect, read_item, shard_items
from pipeline.data.shards import DataError, resolve_shards
from shard_tools.format import is_remote
from shard_tools.fsutil import atomic_open
from shard_tools.imageio import BadImage, load_rgb

logger = logging.getLogger("pipeline.sbi_sheet")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepfake-sbi-sheet", add_help=add_help,
                                description="Contact sheet of self-blended pseudo-fakes made from real images.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data (one of)")
    g.add_argument("--data", default=None, help="a local pack output folder: real samples of its --split")
    g.add_argument("--split", default="train", help="split of --data to draw the real samples from")
    g.add_argument("--images", default=None, help="a folder of real images (walked recursively)")
    g = p.add_argument_group("sheet")
    g.add_argument("--n", type=int, default=8, help="rows (sources) on the sheet, 1..64")
    g.add_argument("--seed", type=int, default=0, help="seed of the choice of sources and of the blends")
    g.add_argument("--sbi-mask", choices=SBI_MASKS, default="face",
                   help="face: the mask on each sample's face-stage box where it has one (packs made with --faces); "
                        "ellipse: the default mask everywhere")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="PNG file to write")
    return p


def _reals(args: argparse.Namespace) -> list:
    if args.data is not None:
        items = shard_items(resolve_shards(args.data, args.split).shards)
    else:
        items, _ = collect([args.images], label=0)
    return [it for it in items if it.label == 0]


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if (args.data is None) == (args.images is None):
        parser.error("give --data PACK_OUT or --images DIR")
    if not 1 <= args.n <= 64:
        parser.error(f"--n {args.n}: must be in [1, 64]")
    if not args.out.lower().endswith(".png"):
        parser.error(f"--out {args.out}: must be a .png file")
    if args.data is not None and is_remote(args.data):
        parser.error(f"--data {args.data}: deepfake-sbi-sheet reads the images of a local pack output; copy it to a "
                     "local folder first (or give --images DIR)")
    try:
        items = _reals(args)
    except (DataError, ValueError, FileNotFoundError) as e:
        logger.error("deepfake-sbi-sheet: %s", e)
        return 2
    rng = np.random.default_rng(args.seed)
    sources, blended, masks = [], [], []
    for i in rng.permutation(len(items)):
        try:
            image = load_rgb(read_item(items[i]))
        except BadImage as e:
            logger.warning("skipped %s: %s", items[i].path, e)
            continue
        box = face_box_in_crop(items[i].face) if args.sbi_mask == "face" else None
        out, mask = self_blend(image, np.random.default_rng([args.seed, int(i)]), face_box=box)
        sources.append(image), blended.append(out), masks.append(mask)
        if len(sources) == args.n:
            break
    if not sources:
        logger.error("deepfake-sbi-sheet: no readable real image in %s", args.data or args.images)
        return 2
    side = min(min(s.shape[:2]) for s in sources)
    crop = lambda a: a[:side, :side]  # noqa: E731  (rows of one size; these are face crops)
    sheet = contact_sheet([crop(s) for s in sources], [crop(b) for b in blended], [crop(m) for m in masks])
    with atomic_open(args.out, "wb") as f:
        Image.fromarray(sheet).save(f, format="PNG")
    logger.info("wrote %s: %d rows of source | pseudo-fake | mask | |difference| x 4", args.out, len(sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
