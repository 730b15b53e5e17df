"""Real servers for the storage tests, bound to 127.0.0.1 only on a free port: moto's S3 server and an HTTP
file server (``http.server`` on a thread). No mocks: s3fs, fsspec and botocore talk to them over TCP.

The HTTP server serves a folder and answers, for testing failures: ``/forbidden/...`` with 403,
``/truncated/NAME`` with the headers of ``NAME`` but only half its bytes before closing, ``/stall/...``
by waiting (bounded) without answering, ``/flaky/NAME`` with a 500 to the first GET of each NAME and then
``NAME`` itself, ``/error500/...`` with 500 always, ``/tars500/...`` with 500 to every GET of a ``.tar``, and ``/loop/...`` with a redirect to itself. Every
request is logged (logger ``servers``, DEBUG: ``http "GET /path HTTP/1.1" 200 -``).
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import logging
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

LOOPBACK = "127.0.0.1"
STALL_S = 5.0  # longest a /stall/ request waits before the server gives up on it
logger = logging.getLogger(__name__)


def free_port() -> int:
    """A port nothing listens on right now (bound once on 127.0.0.1, then released)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server (``moto.server.ThreadedMotoServer``) on 127.0.0.1; ``endpoint`` is its URL."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self._server = ThreadedMotoServer(ip_address=LOOPBACK, port=self.port, verbose=False)

    def start(self) -> "S3Server":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def enforce_auth(self, on: bool) -> None:
        """Make the server check credentials (unknown access keys then get 403) or stop checking."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0" if on else b"inf",
                                     method="POST", headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args) -> None:  # to logging, not stderr
        logger.debug("http %s", fmt % args)

    def _special(self) -> bool:
        if self.path.startswith("/forbidden/"):
            self.send_error(403, "Forbidden")
            return True
        if self.path.startswith("/error500/"):
            self.send_error(500, "Internal Server Error")
            return True
        if self.path.startswith("/loop/"):
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True
        if self.path.startswith("/tars500/"):
            if self.command == "GET" and self.path.endswith(".tar"):
                self.send_error(500, "Internal Server Error")
                return True
            self.path = self.path.replace("/tars500/", "/", 1)
        if self.path.startswith("/flaky/"):
            failed = self.server.__dict__.setdefault("flaky_failed", set())
            if self.command == "GET" and self.path not in failed:
                failed.add(self.path)
                self.send_error(500, "Internal Server Error")
                return True
            self.path = self.path.replace("/flaky/", "/", 1)
        if self.path.startswith("/stall/"):
            time.sleep(STALL_S)
            self.close_connection = True
            return True
        return False

    def do_HEAD(self) -> None:
        if not self._special():
            self.path = self.path.replace("/truncated/", "/", 1)
            super().do_HEAD()

    def do_GET(self) -> None:
        if self._special():
            return
        if not self.path.startswith("/truncated/"):
            super().do_GET()
            return
        path = Path(self.directory, self.path[len("/truncated/"):].lstrip("/"))
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 (threaded); yields the base URL without a trailing slash."""
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), functools.partial(_Handler, directory=str(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="test-http-server", daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
