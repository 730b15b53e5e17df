"""Helpers for the Ray tests: compare two pack outputs byte for byte, and kill a Ray worker mid-task."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

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


class WorkerKiller(threading.Thread):
    """SIGKILLs the first Ray worker process of this test process seen running one of our tasks (its title is
    ``ray::_run_chunk`` while it runs one), ``kills`` times at most; ``killed`` lists the pids."""

    def __init__(self, kills: int = 1, after_s: float = 0.0):
        super().__init__(daemon=True)
        self.kills, self.after_s, self.killed, self._halt = kills, after_s, [], threading.Event()

    def _busy_worker(self) -> Optional[int]:
        import psutil

        for p in psutil.Process().children(recursive=True):
            try:
                if " ".join(p.cmdline()).startswith("ray::_run_chunk"):
                    return p.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return None

    def run(self) -> None:
        time.sleep(self.after_s)
        while not self._halt.is_set() and len(self.killed) < self.kills:
            pid = self._busy_worker()
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
            time.sleep(0.01)

    def stop(self) -> List[int]:
        self._halt.set()
        self.join(5)
        return self.killed
