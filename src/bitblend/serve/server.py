"""`bitblend serve`: load a run in an engine and precision, then run uvicorn.

SIGTERM (and Ctrl-C) shut down gracefully: uvicorn stops accepting connections and waits
for the requests in flight, whose rows the batcher still runs; then the lifespan drains
the batcher's queue and the process exits 0.
"""

from __future__ import annotations

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
# `--engine auto` serves a faster engine only when its eval accuracy trails torch fp32's
# by at most this (the bound: 0.5 points), on every task.
ACCURACY_BOUND = 0.005
AUTO_PRECISION = "bf16"  # the `auto` engine's second candidate: torch bf16


def default_engine(run_dir: Path, bound: float = ACCURACY_BOUND) -> tuple[Predictor, str, str, str]:
    """(predictor, engine, precision, why) for `--engine auto`, the fastest engine measured
    here (docs/serving.md) that keeps every task's eval accuracy within `bound` of torch
    fp32's: ONNX Runtime int8 (fused graph; its eval accuracy is recorded by the export,
    made once into RUN_DIR/onnx), else torch bf16 (measured now), else torch in the run's
    precision. Only for transformer runs whose tasks all have label heads."""
    from bitblend.serve.onnx import LABEL_HEADS, OnnxRun, ensure_export, label_accuracy

    if run_kind(run_dir) != "transformer":
        return load_run(run_dir, "run"), "torch", "run", "not a transformer run"
    ref = load_transformer_run(run_dir, "fp32", needed_by="--engine auto")
    heads = {t.name: ref.head(t.name) for t in ref.tasks}
    odd = [name for name, head in heads.items() if head not in LABEL_HEADS]
    if odd:
        why = f"task {odd[0]}: no accuracy to bound {AUTO_PRECISION} by"
        return load_run(run_dir, "run"), "torch", "run", why
    audio = [n for n, spec in ref.model.specs.items() if "audio" in spec.modalities]
    why_not_int8 = f"task {audio[0]} has audio (not exported)" if audio else ""
    acc32: dict[str, float] = {}  # torch fp32's eval accuracy per task, as the export recorded
    if not audio:
        # Any failure of the export (a graph that fails its check, a read-only run directory,
        # an architecture the exporter or ONNX Runtime cannot take) or of its sessions means
        # int8 is not served: torch serves instead, and the line on stderr says why.
        try:
            tasks = ensure_export(ref, int8=True)["tasks"]
            gaps = [e["fp32_eval_accuracy"] - e["int8_eval_accuracy"] for e in tasks.values()]
            acc32 = {n: e["fp32_eval_accuracy"] for n, e in tasks.items()}
            gap = max(gaps) if gaps and len(tasks) == len(heads) else None
            if gap is not None and gap <= bound:
                why = f"int8 eval accuracy within {max(gap, 0.0) * 100:.2f} points of fp32"
                return OnnxRun.open(ref, int8=True), "onnxruntime", "int8", why
            why_not_int8 = (
                "the export does not cover every task"
                if gap is None
                else f"onnxruntime int8 {gap * 100:.2f} points below fp32"
            )
        except Exception as exc:
            first = (str(exc).splitlines() or [""])[0][:200]
            why_not_int8 = f"onnxruntime int8 not available ({type(exc).__name__}: {first})"
    fast = load_transformer_run(run_dir, AUTO_PRECISION, needed_by="--engine auto")
    worst = -1.0
    for name, head in heads.items():
        table, targets = ref.eval_split(name)
        if name not in acc32:  # not exported: measure fp32 now
            acc32[name] = label_accuracy(head, ref.outputs(name, table), targets)
        acc = label_accuracy(head, fast.outputs(name, table), targets)
        worst = max(worst, acc32[name] - acc)
    del ref
    if worst > bound:
        why = f"{why_not_int8}; {AUTO_PRECISION} eval accuracy {worst * 100:.2f} points below fp32"
        return load_run(run_dir, "run"), "torch", "run", why
    why = (
        f"{why_not_int8}; {AUTO_PRECISION} eval accuracy within "
        f"{max(worst, 0.0) * 100:.2f} points of fp32"
    )
    return fast, "torch", AUTO_PRECISION, why


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
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY on an accepted connection only
    # when its socket says proto == IPPROTO_TCP (accepted sockets inherit it from this one).
    # Without it Nagle held each response's second write until the client's delayed ACK:
    # +40-50 ms on every request of a keep-alive connection (batch-1 p50 60 ms for a 13 ms
    # ONNX Runtime int8 forward; 13 ms once fixed).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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
