"""A real bitblend server on a free loopback port, in this process (a uvicorn thread)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bitblend.runs.base import Predictor
from bitblend.serve.app import ServeOptions, Service, build_app
from bitblend.serve.server import bind, make_server


@contextlib.contextmanager
def running(run: Predictor, **options: Any) -> Iterator[tuple[str, Service]]:
    """(base URL, service) of a server for `run`, ready (warmed up); stopped on exit."""
    app, service = build_app(run, ServeOptions(**options))
    sock = bind("127.0.0.1", 0)
    server = make_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    try:
        wait_ready(url)
        yield url, service
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def wait_ready(url: str, timeout: float = 120.0) -> None:
    """Poll /readyz until 200 (raises after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def histogram(metrics: str, name: str) -> dict[str, float]:
    """{le: cumulative count} plus 'sum' and 'count' of one histogram in /metrics text."""
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="')[1].split('"')[0]
            out[le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_sum "):
            out["sum"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count "):
            out["count"] = float(line.rsplit(" ", 1)[1])
    return out


def gauge(metrics: str, name: str) -> float:
    """The value of a gauge in /metrics text."""
    for line in metrics.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise KeyError(name)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """A JSONL file of rows (predict's input)."""
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
