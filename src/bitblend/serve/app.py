"""The HTTP service (Starlette): POST /v1/predict, GET /healthz, /readyz, /metrics.

Every error is answered as one JSON object `{"error": "<one line>"}` with a 4xx/5xx status;
nothing a client sends stops the server. Model work never runs on the event loop: parsing
with image decoding (or of a large body) runs on Starlette's thread pool; a small text row
parses on the loop (~0.1 ms, less than a thread hop). Tokenising, the forward, the
probabilities and each row's JSON run on the batcher's thread; the loop only joins bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from bitblend.data.modalities import POOLED_HEADS
from bitblend.data.table import Table
from bitblend.runs.base import Predictor
from bitblend.runs.evaluate import predictions
from bitblend.runs.transformer import TransformerRun
from bitblend.serve.batcher import Batcher, Closed, Infer, QueueFull
from bitblend.serve.buckets import Outputs, bucketed
from bitblend.serve.metrics import CONTENT_TYPE, ServeMetrics
from bitblend.serve.requests import RequestError, needs_thread, parse_request

log = logging.getLogger("bitblend.serve")
RETRY_AFTER_S = 1


@dataclass
class ServeOptions:
    """Batching and limits of one server (the `bitblend serve` flags)."""

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_body_bytes: int = 8 * 1024 * 1024
    image_root: Path | None = None
    warmup: bool = True


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error shape: {"error": "<one line>"}."""
    return JSONResponse({"error": " ".join(message.split())}, status, headers=headers)


def warmup_table(run: Predictor, task: str) -> Table:
    """A few rows to run once before /readyz: the eval split's, or one text row."""
    try:
        table, _ = run.eval_split(task)
        return table.take(np.arange(min(len(table), 2)))
    except Exception:  # the run's data is not here: a text row still compiles the text path
        return Table(labels=[None], text=["warm-up"])


def tokenizing_run(run: Predictor) -> TransformerRun | None:
    """The transformer run that encodes `run`'s rows (itself, or an ONNX engine's base)."""
    if isinstance(run, TransformerRun):
        return run
    base = getattr(run, "base", None)  # serve/onnx.py's OnnxRun (onnxruntime not imported)
    return base if isinstance(base, TransformerRun) else None


class Service:
    """One loaded run behind a batcher, and the state /readyz and /metrics report."""

    def __init__(self, run: Predictor, options: ServeOptions) -> None:
        """A service for `run`; the batcher starts with the app's lifespan."""
        self.run = run
        self.options = options
        self.metrics = ServeMetrics()
        self.ready = False
        self.batcher: Batcher | None = None

    def _batcher(self) -> Batcher:
        assert self.batcher is not None, "the lifespan starts the batcher"
        return self.batcher

    async def warm_up(self) -> None:
        """One forward per task on the inference thread, then ready."""
        for task in self.run.tasks:
            if self.run.head(task.name) not in POOLED_HEADS:
                continue
            table = warmup_table(self.run, task.name)
            try:
                # The serving path itself (inference_mode, buckets, rendering) warms up.
                await self._batcher().run_on_thread(
                    partial(self._batcher().infer, task.name, table)
                )
            except Exception as exc:  # not fatal: the first request pays for it instead
                log.warning("warm-up of task %s failed: %s", task.name, exc)
        self.ready = True

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Start the batcher (and warm up); on shutdown drain it."""
        o = self.options
        infer = rendering(self.run, bucketed(self.run, tokenizing_run(self.run)))
        self.batcher = Batcher(
            infer, max_batch=o.max_batch, max_wait_ms=o.max_wait_ms, max_queue=o.max_queue,
            metrics=self.metrics,
        )  # fmt: skip
        self.batcher.start()
        warm = asyncio.create_task(self.warm_up() if o.warmup else self._ready_now())
        try:
            yield
        finally:
            self.ready = False
            await warm
            await self.batcher.close()

    async def _ready_now(self) -> None:
        self.ready = True

    async def _body(self, request: Request) -> bytes:
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(f"body: {declared} bytes, over the {limit}-byte limit", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"body: over the {limit}-byte limit", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def predict(self, request: Request) -> Response:
        """POST /v1/predict: one row -> one prediction; a list of rows -> a list."""
        start = time.perf_counter()
        response = await self._predict(request)
        self.metrics.requests.inc(code=str(response.status_code))
        if response.status_code == 200:
            self.metrics.latency.observe(time.perf_counter() - start)
        return response

    async def _predict(self, request: Request) -> Response:
        batcher = self._batcher()
        batcher.expect()  # a batch being formed may wait for this request's rows
        futures: list[asyncio.Future[Sequence[Any]]] = []
        try:
            body = await self._body(request)
            if needs_thread(body, self.run):
                root = self.options.image_root
                parsed = await run_in_threadpool(parse_request, body, self.run, root)
            else:
                parsed = parse_request(body, self.run, self.options.image_root)
            # Queued synchronously, before `arrived` wakes the worker: a waiting batch sees
            # these rows at once.
            futures = [batcher.enqueue(g.task, g.table) for g in parsed.groups]
        except RequestError as exc:
            return error(exc.status, str(exc))
        except QueueFull:
            for f in futures:  # a multi-task request is queued whole or not at all
                f.cancel()
            return error(503, "server busy: the request queue is full; retry later",
                         {"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
        except Closed:
            return error(503, "server shutting down", {"Retry-After": str(RETRY_AFTER_S)})
        finally:
            batcher.arrived()
        try:
            outs = await asyncio.gather(*futures)
        except Exception as exc:
            log.exception("inference failed")
            return error(500, f"inference failed: {type(exc).__name__}: {exc}")
        result: list[bytes] = [b""] * parsed.size
        for group, out in zip(parsed.groups, outs, strict=True):
            for pos, row in zip(group.positions, out, strict=True):
                if isinstance(row, Exception):
                    return error(500, f"inference failed: {row}")
                result[pos] = row
            self.metrics.rows.inc(len(group.positions), task=group.task)
        body = result[0] if parsed.single else b"[" + b",".join(result) + b"]"
        return Response(body, media_type="application/json")

    async def healthz(self, request: Request) -> Response:
        """Alive (the process answers)."""
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """Ready once warmed up; 503 before and while draining."""
        if self.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False}, 503, headers={"Retry-After": str(RETRY_AFTER_S)})

    async def metrics_text(self, request: Request) -> Response:
        """Prometheus text format."""
        return PlainTextResponse(self.metrics.render(), media_type=CONTENT_TYPE)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")


def render_row(pred: Any) -> bytes | Exception:
    """One prediction as JSONResponse would write it; a non-finite value is an error for
    its own request only, not for the batch it ran in."""
    try:
        return json.dumps(
            pred, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
        ).encode("utf-8")
    except ValueError as exc:
        return exc


def rendering(run: Predictor, infer: Outputs) -> Infer:
    """`infer` followed, on the inference thread, by each row's prediction (probabilities
    of the whole batch at once) rendered as JSON bytes: the event loop only joins them."""

    def infer_rows(task: str, table: Table) -> list[bytes | Exception]:
        out = infer(task, table)
        return [render_row(p) for p in predictions(run, task, out)]

    return infer_rows


def build_app(run: Predictor, options: ServeOptions | None = None) -> tuple[Starlette, Service]:
    """The ASGI app serving `run` (any Predictor: a run, an ensemble, an ONNX engine)."""
    service = Service(run, options or ServeOptions())
    app = Starlette(
        routes=[
            Route("/v1/predict", service.predict, methods=["POST"]),
            Route("/healthz", service.healthz, methods=["GET"]),
            Route("/readyz", service.readyz, methods=["GET"]),
            Route("/metrics", service.metrics_text, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error},
        lifespan=service.lifespan,
    )
    return app, service
