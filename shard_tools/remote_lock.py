"""One writer at a time for a pack output at a URL: the remote counterpart of `shard_tools.outdir.OutputLock`.

The lock is an object ``PREFIX/.deepfake-pack.lock`` holding ``{"tool", "token", "host", "pid", "started"}``,
created with what the store offers (`shard_tools.storage.create_exclusive`: on S3 a conditional PUT,
``If-None-Match: *``, so of two packs started at once exactly one creates it). The pack reads it back
(the token must be its own), checks it again just before it writes ``manifest.json`` (a lock someone
deleted and another pack took meanwhile stops it before it publishes anything), and deletes it at the end.
A store that refuses the condition (an S3 clone without conditional writes) falls back to: refuse if the
lock exists, write it, wait `SETTLE_S`, read it back. Stores with neither are refused (``no-lock``).

A lock left by a killed pack: if it names this host and a pid that has exited, it is removed and taken;
otherwise the message names the host, pid and start time and the object to delete.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
import uuid
from typing import Optional

from shard_tools import storage
from shard_tools.format import MANIFEST
from shard_tools.inputs import InputError
from shard_tools.outdir import LOCK, TOOL
from shard_tools.storage import StorageError

logger = logging.getLogger(__name__)
SETTLE_S = 1.0  # fallback only: how long another writer's PUT may take to become visible


class RemoteLock:
    """``with RemoteLock(url, storage_options) as lock:`` holds ``url/.deepfake-pack.lock``; ``lock.check()``
    raises InputError once the object is no longer this writer's. InputError when another pack holds it."""

    def __init__(self, url: str, storage_options: Optional[dict] = None) -> None:
        self.out, self.opts = url, dict(storage_options or {})
        self.url = storage.join(url, LOCK)
        self.token = uuid.uuid4().hex
        self.held = False

    def _body(self) -> bytes:
        return json.dumps({"tool": TOOL, "token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
                          ).encode()

    def __enter__(self) -> "RemoteLock":
        for attempt in range(2):
            try:
                storage.create_exclusive(self.url, self._body(), storage_options=self.opts)
            except StorageError as e:
                if e.kind == "unsupported":
                    self._fallback()
                    break
                if e.kind == "no-lock":
                    raise InputError(f"--out {self.out}: {e.message}") from None
                if e.kind != "exists":
                    raise
                holder = self._holder()
                if attempt == 0 and holder is not None and _stale(holder):
                    logger.warning("%s: removing the lock of %s, which has exited", self.url, _who(holder))
                    storage.remove_object(self.url, storage_options=self.opts)
                    continue
                raise self._busy(holder) from None
            self.held = True
            self.check()
            break
        return self

    def _fallback(self) -> None:
        logger.info("%s: the store has no conditional writes; taking the lock by write and read-back", self.out)
        if storage.exists(self.url, storage_options=self.opts):
            raise self._busy(self._holder())
        storage.write_bytes(self.url, self._body(), storage_options=self.opts)
        self.held = True
        time.sleep(SETTLE_S)
        self.check()

    def _holder(self) -> Optional[dict]:
        try:
            holder = storage.read_json(self.url, storage_options=self.opts)
        except StorageError as e:
            if e.kind == "not-found":
                return None
            raise
        return holder if isinstance(holder, dict) else {}

    def _busy(self, holder: Optional[dict]) -> InputError:
        if holder is None:
            return InputError(f"--out {self.out} is being written by another {TOOL} (its lock {self.url} came and "
                              "went while this one started); run again")
        return InputError(f"--out {self.out} is being written by another {TOOL} ({_who(holder)}); wait for it to "
                          f"finish, or if that run is gone, delete {self.url} and run again")

    def check(self) -> None:
        """InputError unless the lock object still holds this writer's token (then ``held`` is False)."""
        holder = self._holder()
        if holder is None or holder.get("token") != self.token:
            self.held = False
            who = "nobody: it was deleted" if holder is None else f"now held by {_who(holder)}"
            raise InputError(f"--out {self.out}: this {TOOL} lost its lock {self.url} ({who}); it stopped before "
                             f"writing {MANIFEST}: run it again when no other pack writes there")

    def __exit__(self, *exc) -> None:
        if not self.held:
            return
        try:
            holder = self._holder()
            if holder is not None and holder.get("token") == self.token:
                storage.remove_object(self.url, storage_options=self.opts)
        except StorageError as e:
            logger.warning("warning: could not remove the lock %s (%s); delete it before the next pack", self.url, e)


def _who(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
            if holder.get("tool") == TOOL else "an object this tool did not write")


def _stale(holder: dict) -> bool:
    """True for a lock of this tool, written on this host by a process that has exited."""
    pid = holder.get("pid")
    if holder.get("tool") != TOOL or holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid < 1:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
