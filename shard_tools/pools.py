"""Where the packer's per-file and per-shard tasks run: one interface, two engines.

``LocalPool`` is this machine's ``multiprocessing.Pool`` (or plain ``map`` for one worker); ``RayPool`` runs the
same module-level task functions as Ray tasks on a local Ray started for the run or on a running cluster
(``--ray [ADDRESS]``). Both offer ``imap`` (results in input order) and ``imap_unordered``, so everything the
driver decides (dedup, split, groups, shard plan, manifest) is decided by the same code either way, and the
output is byte-identical.

Ray tasks are retried when their worker process or node dies (``RETRIES`` times; every task here is idempotent:
it writes content-addressed staging files or whole shards through a temp name); an exception raised by the task
itself (a changed input, a storage error) is re-raised on the driver as itself. Ray is imported only here and
only when asked for (``pip install -e ".[ray]"``).
"""
from __future__ import annotations

import collections
import logging
import multiprocessing
import re
import socket
from typing import Callable, Dict, Iterable, Iterator, List, Optional

logger = logging.getLogger(__name__)

RETRIES = 3
INSTALL_HINT = 'pip install -e ".[ray]"'
TASK_ENV = {"OMP_NUM_THREADS": "1"}  # one task = one CPU: no BLAS/OpenCV thread pools fighting over it
_ADDRESS = re.compile(r"(local|auto|(ray://)?[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5})")


class ClusterError(RuntimeError):
    """A Ray task failed for a reason other than its own exception (worker/node died more than RETRIES times,
    object lost), or the cluster could not be joined."""


class RayMissing(RuntimeError):
    """``--ray`` without Ray installed."""


def check_address(flag: str, value: Optional[str]) -> Optional[str]:
    """``--ray`` value check (None: no Ray); ValueError naming the flag and what is accepted."""
    if value is None or _ADDRESS.fullmatch(value):
        return value
    raise ValueError(f"{flag} {value!r}: expected no value (a local Ray for this run), 'auto', HOST:PORT or "
                     f"ray://HOST:PORT (write --ray=ADDRESS, or --ray last, when an input path follows)")


class LocalPool:
    """``multiprocessing.Pool(workers)``, or this process alone for ``workers == 1``."""

    distributed = False

    def __init__(self, workers: int):
        self._mp = multiprocessing.Pool(workers) if workers > 1 else None

    def imap(self, fn: Callable, items: Iterable, chunksize: int = 1) -> Iterator:
        return self._mp.imap(fn, items, chunksize=chunksize) if self._mp else map(fn, items)

    def imap_unordered(self, fn: Callable, items: Iterable, chunksize: int = 1) -> Iterator:
        return self._mp.imap_unordered(fn, items, chunksize=chunksize) if self._mp else map(fn, items)

    def close(self) -> None:
        if self._mp is not None:
            self._mp.terminate()
            self._mp.join()

    def __enter__(self) -> "LocalPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _run_chunk(fn: Callable, chunk: List) -> List:
    return [fn(x) for x in chunk]


class RayPool:
    """The same interface over Ray tasks. ``address``: ``"local"`` starts a Ray with ``workers`` CPUs for this
    run (shut down on close); ``"auto"``/``HOST:PORT``/``ray://HOST:PORT`` joins a running cluster. A Ray
    already initialised in this process (a test, a notebook) is used as it is."""

    distributed = True

    def __init__(self, address: str, workers: int, env: Optional[Dict[str, str]] = None):
        try:
            import ray
        except ImportError:
            raise RayMissing(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
        self.ray, self._started, self._pending = ray, False, set()
        if not ray.is_initialized():
            kw = ({"address": "local", "num_cpus": workers} if address == "local" else {"address": address})
            try:
                if address != "local":
                    _probe(ray, address)
                ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True, **kw)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ClusterError(f"--ray {address}: cannot start or join Ray ({str(e).splitlines()[0]})") from None
            self._started = True
        elif address != "local":
            logger.info("--ray %s: this process has already joined a Ray; using that one", address)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.window = max(2, 2 * cpus)  # tasks in flight: every CPU busy, the next one queued
        self._task = ray.remote(_run_chunk).options(max_retries=RETRIES, num_cpus=1,
                                                     runtime_env={"env_vars": dict(env or TASK_ENV)})
        logger.info("Ray: %d CPUs on %d node(s)%s", cpus, len([n for n in ray.nodes() if n.get("Alive")]),
                    " (started for this run)" if self._started else "")

    def _submit(self, fn_ref, chunk: List):
        ref = self._task.remote(fn_ref, chunk)
        self._pending.add(ref)
        return ref

    def _get(self, ref) -> List:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the task's own exception: re-raised as itself
            raise (e.cause if isinstance(getattr(e, "cause", None), BaseException) else ClusterError(str(e))) from None
        except ray.exceptions.RayError as e:
            raise ClusterError(f"a Ray task failed after {RETRIES} retries ({type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        finally:
            self._pending.discard(ref)

    def imap(self, fn: Callable, items: Iterable, chunksize: int = 1) -> Iterator:
        fn_ref, queue = self.ray.put(fn), collections.deque()
        for chunk in _chunks(items, chunksize):
            queue.append(self._submit(fn_ref, chunk))
            if len(queue) >= self.window:
                yield from self._get(queue.popleft())
        while queue:
            yield from self._get(queue.popleft())

    def imap_unordered(self, fn: Callable, items: Iterable, chunksize: int = 1) -> Iterator:
        fn_ref, running = self.ray.put(fn), []
        chunks = _chunks(items, chunksize)
        for chunk in chunks:
            running.append(self._submit(fn_ref, chunk))
            if len(running) >= self.window:
                break
        while running:
            done, running = self.ray.wait(running, num_returns=1)
            for chunk in chunks:  # refill: one finished, one more in flight
                running.append(self._submit(fn_ref, chunk))
                break
            yield from self._get(done[0])

    def close(self) -> None:
        for ref in list(self._pending):  # a failed or interrupted run: nothing of it keeps running
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # already finished, or its worker is gone
                pass
        self._pending.clear()
        if self._started:
            self.ray.shutdown()

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _probe(ray, address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds when nothing listens at the cluster's address: ``ray.init`` itself retries for minutes."""
    hostport = address.split("://", 1)[-1]
    if address == "auto":
        try:  # where Ray itself would look (RAY_ADDRESS, the last `ray start` on this machine)
            hostport = ray._private.services.canonicalize_bootstrap_address("auto") or ""
        except Exception:  # no cluster recorded, or Ray's internals moved: let ray.init say it
            return
    host, _, port = hostport.rpartition(":")
    if not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"nothing answers at {host}:{port} ({e.strerror or e})") from None


def _chunks(items: Iterable, size: int) -> Iterator[List]:
    chunk: List = []
    for x in items:
        chunk.append(x)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def open_pool(workers: int, ray_address: Optional[str] = None):
    """``LocalPool(workers)``, or a ``RayPool`` when ``ray_address`` is given (``"local"``, ``"auto"``, an address)."""
    return RayPool(ray_address, workers) if ray_address else LocalPool(workers)
