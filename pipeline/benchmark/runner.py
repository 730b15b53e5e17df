"""Run one bench row in a fresh process (spawned, with a timeout); its result or skip reason comes back on a pipe."""
from __future__ import annotations

import logging
import multiprocessing as mp
import traceback
from typing import Optional, Tuple

import psutil

from pipeline.benchmark.harness import SkipRow, TreeMonitor


def _child(kind: str, params: dict, conn, start_method: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # a spawned process defaults to spawning its own children; give the row's DataLoader / pool
    # workers the start method they would get in a normal run of this program
    mp.set_start_method(start_method, force=True)
    try:
        from pipeline.benchmark.rows import get_row_fn

        fn = get_row_fn(kind)
        with TreeMonitor() as monitor:
            rows = fn(params, monitor)
        conn.send(("ok", rows))
    except SkipRow as e:
        conn.send(("skipped", str(e)))
    except BaseException as e:  # reported as a failed row, the run goes on
        detail = traceback.format_exc(limit=-3)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        conn.send(("failed", f"{type(e).__name__}: {msg}"[:300], detail))
    finally:
        conn.close()


def run_row(kind: str, params: dict, *, timeout: float) -> Tuple[str, object, Optional[str]]:
    """Run one row in a fresh spawned process; return ``(status, rows_or_reason, detail)``.

    ``status`` is ``ok`` (a list of row dicts), ``skipped`` or ``failed`` (a one-line reason).
    A child that hangs past ``timeout`` seconds is killed with its workers and reported as failed.
    """
    start_method = mp.get_start_method()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(kind, params, child, start_method), name=f"bench-{kind}")
    proc.start()
    child.close()
    try:
        if parent.poll(timeout):
            msg = parent.recv()
            proc.join(30)
        else:
            msg = ("failed", f"timed out after {timeout:.0f} s (--row-timeout)", None)
    except EOFError:
        proc.join(5)
        msg = ("failed", f"row process died (exit code {proc.exitcode})", None)
    finally:
        if proc.is_alive():
            _kill_tree(proc.pid)
        proc.join(10)
        parent.close()
    status, payload = msg[0], msg[1]
    detail = msg[2] if len(msg) > 2 else None
    return status, payload, detail


def _kill_tree(pid: int) -> None:
    """End a row process and any workers it left behind (only the descendants of ``pid``)."""
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
