"""deepfake-pack and deepfake-inspect on a URL (``s3://bucket/prefix``, ``https://...``, any fsspec URL).

pack: the output is built in a local temp folder exactly as a local pack (``$TMPDIR``, needs room for the whole
output), then uploaded through :mod:`shard_tools.storage`: shards and ``.idx`` files in parallel, ``manifest.json``
last. With ``--ray`` the old manifest is deleted before the first shard is written, each Ray task uploads the
shards it writes itself (and the face crops wait under ``URL/.deepfake-pack-staging/``), and the driver
uploads only the manifest, last. A prefix that already holds a manifest is refused without ``--overwrite``; with it the old manifest is
deleted first (the prefix reads as incomplete from then on) and old shard/index names that the new pack does
not rewrite are deleted; nothing else under the prefix is touched.

inspect: the manifest is read from the URL; ``--verify``/``--grid`` download the listed shards and indexes
into a temp folder and check them as a local folder, with problems named by their URL.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Callable, List

from tqdm import tqdm

from shard_tools import fsutil
from shard_tools.format import MANIFEST
from shard_tools.inputs import InputError
from shard_tools.plan import SPLITS
from shard_tools.storage import (StorageError, download_verified, exists, join, list_names, parse_storage_options,
                                 remove_pack, upload_folder)

logger = logging.getLogger(__name__)
_PACK_NAME = re.compile(r"^(%s)-[0-9]+\.(tar|idx)$" % "|".join(SPLITS))
_DOWNLOAD_THREADS = 8


def _url(text: str, flag: str) -> str:
    if text.startswith("pipe:"):
        raise InputError(f"{flag} {text}: pipe: commands are for the loaders; give a URL such as s3://bucket/prefix")
    return text.rstrip("/")


def _record_url(manifest_path: Path, url: str, opts: dict) -> None:
    """The manifest names the URL it was packed to; storage options are recorded by key only (they may hold secrets)."""
    manifest = json.loads(manifest_path.read_text())
    manifest["args"]["out"] = url
    manifest["args"]["storage_options"] = sorted(opts)
    fsutil.atomic_write_json(manifest_path, manifest)


def _quiet_clients() -> None:
    """botocore says "Found credentials in environment variables." at INFO; a CLI run shows warnings only."""
    for name in ("botocore", "aiobotocore", "s3fs", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)


def pack_to_url(args: argparse.Namespace, run_local: Callable[[argparse.Namespace], int]) -> int:
    """``deepfake-pack --out URL``: ``run_local`` (pack.run) into a temp folder, then publish it to the URL."""
    _quiet_clients()
    url = _url(str(args.out), "--out")
    opts = parse_storage_options(args.storage_options)
    if exists(join(url, MANIFEST), storage_options=opts) and not args.overwrite:
        raise InputError(f"--out {url} already holds a complete pack output ({MANIFEST}); pass --overwrite to replace it")
    with tempfile.TemporaryDirectory(prefix="deepfake-pack-") as tmp:
        local = Path(tmp, "out")
        direct = {"_remote": (url, opts)} if getattr(args, "ray", None) else {}  # Ray tasks upload the shards
        rc = run_local(argparse.Namespace(**{**vars(args), "out": str(local), "storage_options": None, **direct}))
        if rc != 0:
            return rc
        _record_url(local / MANIFEST, url, opts)
        files = sorted(p.name for p in local.iterdir() if p.is_file() and not p.name.startswith(fsutil.TMP_PREFIX))
        written = set(_shard_names(json.loads((local / MANIFEST).read_text())))
        stale = [n for n in list_names(url, storage_options=opts)
                 if n == MANIFEST or (_PACK_NAME.match(n) and n not in written)]
        if stale:
            logger.info("%s: removing the old %s and %d old shard/index objects", url,
                        MANIFEST if MANIFEST in stale else "(no manifest)", len(stale) - (MANIFEST in stale))
            remove_pack(url, stale, storage_options=opts)
        upload_folder(local, url, files, workers=max(4, args.workers), last=(MANIFEST,), storage_options=opts)
    return 0


def _shard_names(manifest: dict) -> List[str]:
    names = []
    for info in manifest.get("splits", {}).values():
        for entry in info.get("shards", []):
            names.append(entry["name"])
            names.append(entry.get("index") or Path(entry["name"]).with_suffix(".idx").name)
    return names


def _fetch(url: str, names: List[str], dest: Path, opts: dict) -> None:
    """Download ``url/name`` for each name into ``dest``; a missing object is left out (verify reports it)."""
    def one(name: str) -> None:
        try:
            download_verified(join(url, name), dest, storage_options=opts)
        except StorageError as e:
            if e.kind != "not-found":
                raise
            logger.debug("%s: missing, left for verify to report", e.url)

    logger.info("downloading %d shard/index objects from %s to a temp folder", len(names), url)
    with concurrent.futures.ThreadPoolExecutor(_DOWNLOAD_THREADS) as pool:
        for _ in tqdm(pool.map(one, names), total=len(names), desc="download", unit="file", dynamic_ncols=True):
            pass


def inspect_url(args: argparse.Namespace, inspect_folder: Callable[..., int]) -> int:
    """``deepfake-inspect URL``: fetch the manifest (and for --verify/--grid the shards) into a temp folder and
    run ``inspect_folder(args, folder, shown=URL)`` on it. Exit 2 on a storage failure, with one line."""
    _quiet_clients()
    try:
        url = _url(str(args.out), "OUT")
        opts = parse_storage_options(args.storage_options)
        with tempfile.TemporaryDirectory(prefix="deepfake-inspect-") as tmp:
            root = Path(tmp)
            manifest_url = join(url, MANIFEST)
            if not exists(manifest_url, storage_options=opts):
                logger.error("error: %s is missing: %s is not a complete pack output", manifest_url, url)
                return 2
            download_verified(manifest_url, root, storage_options=opts)
            try:
                names = _shard_names(json.loads((root / MANIFEST).read_text()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                logger.error("error: %s is not a deepfake-pack manifest (%s: %s)", manifest_url, type(e).__name__, e)
                return 2
            if args.verify or args.grid:
                _fetch(url, names, root, opts)
            return inspect_folder(args, root, shown=url)
    except (StorageError, InputError) as e:
        logger.error("error: %s", e)
        return 2
