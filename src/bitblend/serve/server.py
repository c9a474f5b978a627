"""`bitblend serve`: load a run in an engine and precision, then run uvicorn.

SIGTERM (and Ctrl-C) shut down gracefully: uvicorn stops accepting connections and waits
for the requests in flight, whose rows the batcher still runs; then the lifespan drains
the batcher's queue and the process exits 0.
"""

from __future__ import annotations

import importlib.util
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

import uvicorn

from bitblend.errors import BitblendError
from bitblend.runs.base import Predictor
from bitblend.runs.load import load_run, load_transformer_run, run_kind
from bitblend.serve.app import ServeOptions, build_app

ENGINES = ("auto", "torch", "onnxruntime")
ONNX_PRECISIONS = ("run", "fp32", "int8")
# The int8 engine may be the default only when its eval accuracy trails torch fp32's by at
# most this (the bound: 0.5 points), on every task.
ACCURACY_BOUND = 0.005


def default_engine(run_dir: Path, bound: float = ACCURACY_BOUND) -> tuple[Predictor, str, str, str]:
    """(predictor, engine, precision, why) for `--engine auto`: ONNX Runtime int8, the
    fastest engine measured at batch 1 (docs/serving.md), when the run is a transformer run,
    onnxruntime is installed and the int8 graph's eval accuracy is within `bound` of torch
    fp32's on every task; otherwise torch in the run's precision."""
    if run_kind(run_dir) != "transformer":
        return load_run(run_dir, "run"), "torch", "run", "not a transformer run"
    if importlib.util.find_spec("onnxruntime") is None:
        return load_run(run_dir, "run"), "torch", "run", "onnxruntime is not installed"
    from bitblend.serve.onnx import MANIFEST, OnnxRun, ensure_export, export_onnx

    fp32 = load_transformer_run(run_dir, "fp32", needed_by="--engine auto")
    manifest = ensure_export(fp32, int8=True)
    entries = manifest["tasks"].values()
    if not all("int8_eval_accuracy" in e for e in entries):  # exported before the field
        manifest = export_onnx(fp32, run_dir / "onnx", int8=True)
        entries = manifest["tasks"].values()
    if not all("int8_eval_accuracy" in e for e in entries):
        why = "a task's head has no eval accuracy to bound int8 by"
        return load_run(run_dir, "run"), "torch", "run", why
    worst = max(e["fp32_eval_accuracy"] - e["int8_eval_accuracy"] for e in entries)
    if worst > bound:
        why = f"int8 eval accuracy {worst * 100:.2f} points below fp32 (> {bound * 100:g})"
        return load_run(run_dir, "run"), "torch", "run", why
    why = f"int8 eval accuracy within {max(worst, 0.0) * 100:.2f} points of fp32 ({MANIFEST})"
    return OnnxRun.open(fp32, int8=True), "onnxruntime", "int8", why


def load_engine(run_dir: Path, precision: str = "run", engine: str = "torch") -> Predictor:
    """The run as a Predictor in `engine`: torch in any serving precision (any kind of run),
    or ONNX Runtime in fp32 / int8 (transformer runs; exported into RUN_DIR/onnx/ if missing).
    `auto` is `default_engine` for precision `run`, torch for any other precision."""
    if engine not in ENGINES:
        raise BitblendError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    if engine == "auto":
        if precision == "run":
            return default_engine(run_dir)[0]
        engine = "torch"
    if engine == "torch":
        return load_run(run_dir, precision)
    if precision not in ONNX_PRECISIONS:
        raise BitblendError(
            f"--precision {precision}: --engine onnxruntime serves {', '.join(ONNX_PRECISIONS)} "
            "(run = the fp32 export)"
        )
    from bitblend.serve.onnx import OnnxRun

    run = load_transformer_run(run_dir, "fp32", needed_by="--engine onnxruntime")
    return OnnxRun.open(run, int8=precision == "int8")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port; read it from getsockname())."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BitblendError(
            f"--host {host} --port {port}: cannot listen ({exc.strerror})"
        ) from None
    sock.listen(2048)
    return sock


def make_server(app: object, *, graceful_s: float = 30.0) -> uvicorn.Server:
    """A uvicorn server for `app` that exits 0 after a graceful SIGTERM shutdown."""

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal after shutdown (so the process dies of
            # it, exit 143); a drained SIGTERM is an orderly stop, so exit 0 instead.
            if sig == signal.SIGTERM and sig in self._captured_signals:
                self._captured_signals.remove(sig)

    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=int(graceful_s),
        access_log=False,
    )
    return Server(config)


def serve(run: Predictor, sock: socket.socket, options: ServeOptions, announce: str = "") -> int:
    """Serve `run` on a bound socket until SIGTERM/SIGINT; 0 after a graceful drain."""
    app, _ = build_app(run, options)
    server = make_server(app)
    if announce:
        print(announce, file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 0
