"""Helpers for the Ray tests: compare two pack outputs byte for byte, and kill a Ray worker mid-task."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Dict, List

RUN_ARGS = ("out", "ray", "workers", "storage_options")  # the manifest's record of how the run ran, not what it made


def manifest_without_run(path: Path) -> dict:
    m = json.loads(path.read_text())
    for key in RUN_ARGS:
        m["args"].pop(key, None)
    return m


def tree_bytes(root: Path) -> Dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) by relative path, bytes; the manifest without RUN_ARGS."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(root))
            out[rel] = (json.dumps(manifest_without_run(p), sort_keys=True).encode() if rel == "manifest.json"
                        else p.read_bytes())
    return out


def assert_same_output(a: Path, b: Path) -> None:
    ta, tb = tree_bytes(a), tree_bytes(b)
    assert sorted(ta) == sorted(tb)  # no stray temp or staging file either side
    assert any(n.endswith(".tar") for n in ta)
    for name in ta:
        assert ta[name] == tb[name], name


class TaskWatcher(threading.Thread):
    """Watches this test process's Ray worker processes (their title is ``ray::_run_chunk`` while they run one of
    our tasks): ``seen`` holds ``(pid, parent pid)`` of each busy one (the parent is its node's raylet). With
    ``kills``, SIGKILLs the first ``kills`` busy workers it sees instead; ``killed`` lists them."""

    def __init__(self, kills: int = 0):
        super().__init__(daemon=True)
        self.kills, self.killed, self.seen, self._halt = kills, [], set(), threading.Event()

    def _busy_workers(self) -> List[tuple]:
        import psutil

        out = []
        for p in psutil.Process().children(recursive=True):
            try:
                if " ".join(p.cmdline()).startswith("ray::_run_chunk"):
                    out.append((p.pid, p.ppid()))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def run(self) -> None:
        while not self._halt.is_set():
            for pid, ppid in self._busy_workers():
                self.seen.add((pid, ppid))
                if len(self.killed) < self.kills:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
            time.sleep(0.01)

    def stop(self) -> "TaskWatcher":
        self._halt.set()
        self.join(5)
        return self
