"""Helpers for the hostile-input, security and fault tests: a real uvicorn server per test
module, raw HTTP over a socket (so `..` and odd bytes reach the server unnormalised) and the
resident memory of a process."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi import FastAPI
from redis_server import free_port
from service_support import ServerThread

RAW_TIMEOUT_S = 10.0
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@contextmanager
def served(app: FastAPI, **options: object) -> Iterator[ServerThread]:
    """`app` on uvicorn on 127.0.0.1:<free port>, ready (loaded) when the block starts;
    `options` go to `uvicorn.Config`."""
    server = ServerThread(app, free_port(), **options).start()
    try:
        yield server
    finally:
        server.stop()


def raw_request(port: int, request: bytes, *, timeout_s: float = RAW_TIMEOUT_S) -> bytes:
    """Send `request` verbatim and return everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def raw_get(port: int, target: str, *, method: str = "GET") -> tuple[int, bytes]:
    """(status, whole response) for `METHOD target` sent exactly as written."""
    request = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    response = raw_request(port, request.encode("latin-1"))
    status_line = response.split(b"\r\n", 1)[0]
    return int(status_line.split()[1]), response


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of `pid` (this process by default), from /proc."""
    statm = Path(f"/proc/{pid or os.getpid()}/statm").read_text().split()
    return int(statm[1]) * PAGE_SIZE


class RssSampler:
    """Samples the RSS of a process every `interval_s` in a thread; `peak` is the largest."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.01) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.baseline = rss_bytes(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.baseline
