"""deepfake-pack and deepfake-inspect on a URL (``s3://bucket/prefix``, ``https://...``, any fsspec URL).

pack: under the prefix's lock (`shard_tools.remote_lock.RemoteLock`: one pack per prefix, taken with an S3
conditional write), the output is built in a local temp folder exactly as a local pack (``$TMPDIR``, needs
room for the whole output; `fsutil.owned_tempdir`, so a killed pack's folder is removed by the next one),
then uploaded through :mod:`shard_tools.storage`: shards and ``.idx`` files in parallel, ``manifest.json``
last, and only while the lock is still this pack's. A prefix that already holds a manifest is refused without
``--overwrite``, and always when the manifest is not this tool's; with it the old manifest is deleted first
(the prefix reads as incomplete from then on) and old shard/index names that the new pack does not rewrite
are deleted; nothing else under the prefix is touched. With ``--ray`` each Ray task uploads the shards it
writes itself (the face crops wait under ``URL/.deepfake-pack-staging/``), and the driver uploads only the
manifest, last, after checking the lock.

inspect: the manifest is read from the URL and validated (`_shard_names`) before any other URL is built from
it; ``--verify``/``--grid`` then download the listed shards and indexes into a temp folder and check them as
a local folder, with problems named by their URL.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Callable, List, Optional, Set, Tuple

from tqdm import tqdm

from shard_tools import fsutil, outdir
from shard_tools.format import MANIFEST
from shard_tools.inputs import InputError
from shard_tools.plan import SPLITS
from shard_tools.remote_lock import RemoteLock
from shard_tools.storage import (StorageError, download_verified, exists, join, list_names, parse_storage_options,
                                 protocol_of, read_json, remove_pack, size, upload_folder)
from shard_tools.verify import check_manifest

logger = logging.getLogger(__name__)
_PACK_NAME = re.compile(r"^(%s)-[0-9]+\.(tar|idx)$" % "|".join(SPLITS))
_DOWNLOAD_THREADS = 8
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
MAX_SHARDS = 100_000  # per manifest: a pack of 100 M samples at the default 1,000 per shard
MAX_MANIFEST_BYTES = 256 << 20


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


def _old_output(url: str, opts: dict, overwrite: bool) -> Optional[Set[str]]:
    """The names the manifest already at ``url`` lists (None when there is none); InputError for a foreign
    manifest (never replaced, as in a folder) or, without ``overwrite``, for a complete output."""
    manifest_url = join(url, MANIFEST)
    if not exists(manifest_url, storage_options=opts):
        return None
    names = outdir.claimed_names(read_json(manifest_url, storage_options=opts), manifest_url)
    if not overwrite:
        raise InputError(f"--out {url} already holds a complete pack output ({MANIFEST}); pass --overwrite to replace it")
    return names


def pack_to_url(args: argparse.Namespace, run_local: Callable[[argparse.Namespace], int]) -> int:
    """``deepfake-pack --out URL``: under the prefix's lock (`RemoteLock`), ``run_local`` (pack.run) into a temp
    folder, then publish it to the URL, the manifest last and only while the lock is still this run's."""
    _quiet_clients()
    url = _url(str(args.out), "--out")
    opts = parse_storage_options(args.storage_options)
    if protocol_of(url) in ("http", "https"):
        raise InputError(f"--out {url}: HTTP(S) is read-only here: pack to s3:// (or a local folder) and serve that")
    with RemoteLock(url, opts) as lock, fsutil.owned_tempdir("deepfake-pack-") as tmp:
        _old_output(url, opts, args.overwrite)
        local = Path(tmp, "out")
        direct = {"_remote": (url, opts)} if getattr(args, "ray", None) else {}  # Ray tasks upload the shards
        rc = run_local(argparse.Namespace(**{**vars(args), "out": str(local), "storage_options": None, **direct}))
        if rc != 0:
            return rc
        _record_url(local / MANIFEST, url, opts)
        files = sorted(p.name for p in local.iterdir() if p.is_file() and not p.name.startswith(fsutil.TMP_PREFIX))
        lock.check()
        written = set(_shard_names(json.loads((local / MANIFEST).read_text()))[0])
        stale = [n for n in list_names(url, storage_options=opts)
                 if n == MANIFEST or (_PACK_NAME.match(n) and n not in written)]
        if stale:
            logger.info("%s: removing the old %s and %d old shard/index objects", url,
                        MANIFEST if MANIFEST in stale else "(no manifest)", len(stale) - (MANIFEST in stale))
            remove_pack(url, stale, storage_options=opts)
        upload_folder(local, url, files, workers=max(4, args.workers), last=(MANIFEST,), storage_options=opts,
                      before_last=lock.check)
    return 0


def _shard_names(manifest) -> Tuple[List[str], int]:
    """(shard and index names, listed bytes) of an untrusted manifest, validated before any URL is built
    from them: the structure (`shard_tools.verify.check_manifest`), names of letters, digits, ``.``, ``_`` and
    ``-`` only (nothing a URL or a path reads as a separator, a parent or a query), at most `MAX_SHARDS`
    shards, byte counts that are whole numbers. ValueError naming the field."""
    why = check_manifest(manifest)
    if why:
        raise ValueError(why)
    names, total = [], 0
    for split, info in manifest["splits"].items():
        if len(names) + 2 * len(info["shards"]) > 2 * MAX_SHARDS:
            raise ValueError(f"lists more than {MAX_SHARDS} shards, more than any pack this tool inspects")
        for i, entry in enumerate(info["shards"]):
            index = entry.get("index") or Path(entry["name"]).with_suffix(".idx").name
            for field, name in (("name", entry["name"]), ("index", index)):
                if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
                    raise ValueError(f"splits.{split}.shards[{i}].{field} {name!r} is not a plain file name "
                                     "(letters, digits, '.', '_', '-')")
                names.append(name)
            nbytes = entry.get("bytes", 0)
            if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
                raise ValueError(f"splits.{split}.shards[{i}].bytes {nbytes!r} is not a byte count")
            total += nbytes
    return names, total


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


def _size_or_zero(url: str, opts: dict) -> int:
    try:
        return size(url, storage_options=opts)
    except StorageError as e:
        if e.kind != "not-found":  # a server that gives no size: the download is bounded by nothing else
            raise
        return 0


def inspect_url(args: argparse.Namespace, inspect_folder: Callable[..., int]) -> int:
    """``deepfake-inspect URL``: fetch the manifest, validate it, and for --verify/--grid fetch the shards it
    lists into a temp folder, then run ``inspect_folder(args, folder, shown=URL)`` on it. Exit 2 on a storage
    failure or a manifest that cannot be trusted, with one line; nothing is fetched before it is validated."""
    _quiet_clients()
    try:
        url = _url(str(args.out), "OUT")
        opts = parse_storage_options(args.storage_options)
        with fsutil.owned_tempdir("deepfake-inspect-") as root:
            manifest_url = join(url, MANIFEST)
            if not exists(manifest_url, storage_options=opts):
                logger.error("error: %s is missing: %s is not a complete pack output", manifest_url, url)
                return 2
            if _size_or_zero(manifest_url, opts) > MAX_MANIFEST_BYTES:
                logger.error("error: %s is larger than %d MiB: not a deepfake-pack manifest", manifest_url,
                             MAX_MANIFEST_BYTES >> 20)
                return 2
            download_verified(manifest_url, root, storage_options=opts)
            try:
                names, nbytes = _shard_names(fsutil.loads_json((root / MANIFEST).read_bytes()))
            except ValueError as e:
                logger.error("error: %s is not a deepfake-pack manifest (%s); nothing was downloaded", manifest_url, e)
                return 2
            if args.verify or args.grid:
                free = shutil.disk_usage(root).free
                if nbytes > free:
                    raise InputError(f"{url}: its shards need {nbytes / 2**30:.1f} GiB in the temp folder {root.parent}, "
                                     f"{free / 2**30:.1f} GiB are free; point TMPDIR at a larger disk")
                _fetch(url, names, root, opts)
            return inspect_folder(args, root, shown=url)
    except (StorageError, InputError) as e:
        logger.error("error: %s", e)
        return 2
