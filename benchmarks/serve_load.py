"""Load test of `bitblend serve` per engine x precision, against a naive server anchor.

Open-loop load on 127.0.0.1 only, bounded in requests and seconds. For each server (one
subprocess each, started and stopped in turn):
  1. batch-1 latency without load: single-row requests one after another (p50/p99)
  2. max sustained throughput: `--clients` closed-loop clients for `--seconds` (rows/s)
  3. open-loop Poisson arrivals at 50% and 80% of that throughput for `--seconds` each:
     p50/p95/p99 latency, completed rate, errors
  4. accuracy on the run's eval split, one row per request through the server
The anchor is a naive server: the same model (the run in its own precision), one forward
per request in Starlette's thread pool (what a plain sync endpoint does), no batching.

    .venv/bin/python benchmarks/serve_load.py RUN_DIR [--configs torch:fp32,onnxruntime:int8]
        [--seconds 10] [--clients 32] [--eval-rows 200] [--json OUT]
    .venv/bin/python benchmarks/serve_load.py RUN_DIR --interleave [--window 4 --cycles 3]
    .venv/bin/python benchmarks/serve_load.py RUN_DIR --slo-ms 100   # + rate at p99 <= 100 ms

`--slo-ms` adds, per server, the highest open-loop (Poisson) rate it sustains with p99
within the SLO (bisection below its closed-loop maximum): throughput *at* a latency bound,
the figure a serving target like "3x at p99 <= 100 ms" asks for.

`--interleave` starts every server at once and alternates between them (batch-1 requests
one by one, throughput windows in turn): on a shared machine whose load swings between
minutes, ratios between configs then come from the same conditions.

The load generator shares the machine's cores with the server: on a 2-core machine its
own work is part of every figure; compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MIN_SLO_REQUESTS = 50  # per --slo-ms window
CONFIGS = "naive:run,torch:run,torch:fp32,torch:bf16,torch:int8,onnxruntime:fp32,onnxruntime:int8"


def naive_app(run_dir: str) -> Any:
    """The anchor: one forward per request, no batching, a sync endpoint (thread pool)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from bitblend.commands.common import quiet_libraries as _quiet_libraries
    from bitblend.data.table import Table
    from bitblend.runs.evaluate import predictions
    from bitblend.runs.load import load_run

    _quiet_libraries()
    run = load_run(Path(run_dir), "run")
    task = run.tasks[0].name
    run.outputs(task, Table(labels=[None], text=["warm-up"]))

    async def predict(request: Request) -> JSONResponse:
        row = await request.json()
        from starlette.concurrency import run_in_threadpool

        out = await run_in_threadpool(run.outputs, task, Table(labels=[None], text=[row["text"]]))
        return JSONResponse(predictions(run, task, out)[0])

    async def ready(request: Request) -> JSONResponse:
        return JSONResponse({"ready": True})

    return Starlette(
        routes=[Route("/v1/predict", predict, methods=["POST"]), Route("/readyz", ready)]
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(run_dir: str, engine: str, precision: str, port: int) -> subprocess.Popen[str]:
    """`bitblend serve` (or the naive anchor) as a subprocess on 127.0.0.1:port."""
    # Both servers run with the environment `bitblend serve` sets for itself (no tokenizers
    # thread pool, passive OpenMP waiting): the anchor's figures then differ by batching
    # and engine only, not by a spin-waiting pathology on a shared machine.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
           "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}  # fmt: skip
    if engine == "naive":
        cmd = [sys.executable, __file__, run_dir, "--naive-server", "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "bitblend.cli", "serve", run_dir, "--engine", engine,
               "--precision", precision, "--port", str(port)]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)


async def wait_ready(client: Any, url: str, proc: subprocess.Popen[str], limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if (await client.get(f"{url}/readyz")).status_code == 200:
                return
        except Exception:
            pass
        await asyncio.sleep(0.25)
    raise TimeoutError(f"{url} not ready in {limit} s")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1000 if xs else float("nan")


async def one(client: Any, url: str, text: str) -> tuple[float, int, Any]:
    t0 = time.perf_counter()
    try:
        r = await client.post(f"{url}/v1/predict", json={"text": text})
        return time.perf_counter() - t0, r.status_code, r.json() if r.status_code == 200 else None
    except Exception:
        return time.perf_counter() - t0, 0, None


async def unloaded(client: Any, url: str, texts: list[str], n: int) -> dict[str, float]:
    lat = [(await one(client, url, texts[i % len(texts)]))[0] for i in range(n)]
    return {"b1_p50_ms": pct(lat, 50), "b1_p99_ms": pct(lat, 99)}


async def saturate(client: Any, url: str, texts: list[str], clients: int, seconds: float,
                   max_requests: int) -> float:  # fmt: skip
    """Completed requests/s with `clients` closed-loop clients (each waits for its answer)."""
    stop = time.perf_counter() + seconds
    done = 0

    async def worker(k: int) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < stop and done < max_requests:
            _, code, _ = await one(client, url, texts[i % len(texts)])
            done += code == 200
            i += clients

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(clients)))
    return done / (time.perf_counter() - t0)


async def open_loop(client: Any, url: str, texts: list[str], rate: float, seconds: float,
                    max_requests: int, seed: int) -> dict[str, float]:  # fmt: skip
    """Poisson arrivals at `rate`/s, sent whether or not earlier ones finished."""
    rng = random.Random(seed)
    tasks = []
    t0 = time.perf_counter()
    at = 0.0
    i = 0
    while at < seconds and i < max_requests:
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(client, url, texts[i % len(texts)])))
        at += rng.expovariate(rate)
        i += 1
    results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    ok = [lat for lat, code, _ in results if code == 200]
    return {"offered_rps": rate, "completed_rps": len(ok) / wall, "errors": len(results) - len(ok),
            "p50_ms": pct(ok, 50), "p95_ms": pct(ok, 95), "p99_ms": pct(ok, 99)}  # fmt: skip


async def slo_rate(client: Any, url: str, texts: list[str], hi: float, slo_ms: float,
                   seconds: float, max_requests: int, steps: int) -> dict[str, float]:  # fmt: skip
    """The highest Poisson arrival rate the server sustains within a p99 latency SLO:
    bisection over (0, hi] with open-loop windows; a rate passes when every request
    succeeds and p99 <= `slo_ms` (a server that falls behind its arrivals fails by latency).
    A window lasts `seconds` or until MIN_SLO_REQUESTS have been sent, whichever is longer,
    so a low rate's p99 is not the max of a handful of requests."""
    lo, p99 = 0.0, float("nan")
    if not hi > 0:  # no closed-loop throughput (0 or NaN): nothing to bisect
        return {"slo_rps": 0.0, "slo_p99_ms": p99}
    for k in range(steps):
        rate = (lo + hi) / 2
        window = max(seconds, MIN_SLO_REQUESTS / rate)
        res = await open_loop(client, url, texts, rate, window, max_requests, seed=100 + k)
        if res["errors"] == 0 and res["p99_ms"] <= slo_ms:
            lo, p99 = rate, res["p99_ms"]
        else:
            hi = rate
    return {"slo_rps": lo, "slo_p99_ms": p99}


async def accuracy(client: Any, url: str, texts: list[str], labels: list[str]) -> float:
    sem = asyncio.Semaphore(16)

    async def go(t: str) -> Any:
        async with sem:
            return (await one(client, url, t))[2]

    got = await asyncio.gather(*(go(t) for t in texts))
    return float(
        np.mean([g is not None and g["label"] == y for g, y in zip(got, labels, strict=True)])
    )


def eval_rows(run_dir: str, limit: int) -> tuple[list[str], list[str]]:
    from bitblend.commands.common import quiet_libraries as _quiet_libraries
    from bitblend.runs.load import load_run

    _quiet_libraries()
    run = load_run(Path(run_dir), "run")
    task = run.tasks[0].name
    table, y = run.eval_split(task)
    names = run.label_names(task)
    n = min(limit, len(table))
    return [str(t) for t in (table.text or [])[:n]], [names[int(k)] for k in y[:n]]


async def measure(args: argparse.Namespace, engine: str, precision: str, texts: list[str],
                  labels: list[str]) -> dict[str, Any]:  # fmt: skip
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args.run_dir, engine, precision, port)
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    row: dict[str, Any] = {"engine": engine, "precision": precision}
    try:
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            await wait_ready(client, url, proc, args.ready_timeout)
            row |= await unloaded(client, url, texts, args.unloaded)
            row["max_rps"] = await saturate(client, url, texts, args.clients, args.seconds,
                                            args.max_requests)  # fmt: skip
            for share in (0.5, 0.8):
                res = await open_loop(client, url, texts, share * row["max_rps"], args.seconds,
                                      args.max_requests, seed=int(share * 10))  # fmt: skip
                row |= {f"at{int(share * 100)}_{k}": v for k, v in res.items()}
            if args.slo_ms:
                row |= await slo_rate(client, url, texts, row["max_rps"], args.slo_ms,
                                      args.seconds, args.max_requests, args.slo_steps)  # fmt: skip
            row["accuracy"] = await accuracy(client, url, texts, labels)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            row["exit_code"] = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            row["exit_code"] = "killed"
    return row


async def interleaved(args: argparse.Namespace, specs: list[str],
                      texts: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    """Every server up at once; batch-1 requests alternate between them and throughput
    windows (`--window` s each) cycle through them `--cycles` times, so each sees the same
    machine load: the ratios hold on a shared machine whose speed swings between minutes."""
    import httpx

    servers = []
    for spec in specs:
        engine, precision = spec.split(":")
        port = free_port()
        servers.append((spec, f"http://127.0.0.1:{port}",
                        start_server(args.run_dir, engine, precision, port)))  # fmt: skip
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    rows: dict[str, dict[str, Any]] = {s: {"config": s, "b1": [], "done": 0, "wall": 0.0}
                                       for s in specs}  # fmt: skip
    try:
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            for _, url, proc in servers:
                await wait_ready(client, url, proc, args.ready_timeout)
            load = os.getloadavg()[0]
            for i in range(args.unloaded + 2):  # 2 warm-up rounds
                for spec, url, _ in servers:
                    lat, code, _ = await one(client, url, texts[i % len(texts)])
                    if i >= 2 and code == 200:
                        rows[spec]["b1"].append(lat)
            for _ in range(args.cycles):
                for spec, url, _ in servers:
                    t0 = time.perf_counter()
                    rps = await saturate(client, url, texts, args.clients, args.window,
                                         args.max_requests)  # fmt: skip
                    wall = time.perf_counter() - t0
                    rows[spec]["done"] += rps * wall
                    rows[spec]["wall"] += wall
    finally:
        for _, _, proc in servers:
            proc.send_signal(signal.SIGTERM)
        for _, _, proc in servers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    out = []
    for spec in specs:
        r = rows[spec]
        out.append({"config": spec, "b1_p50_ms": pct(r["b1"], 50), "b1_p99_ms": pct(r["b1"], 99),
                    "max_rps": r["done"] / max(r["wall"], 1e-9), "load_avg_1m": load})  # fmt: skip
    ref = {r["config"]: r for r in out}
    for r in out:
        if "torch:fp32" in ref:
            r["b1_vs_torch_fp32"] = r["b1_p50_ms"] / ref["torch:fp32"]["b1_p50_ms"]
        if "naive:run" in ref:
            r["rps_vs_naive"] = r["max_rps"] / ref["naive:run"]["max_rps"]
    return out


def summary(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the sequential rows."""
    out = ["| server | b1 p50 / p99 ms | max rows/s | x naive | rows/s at p99 <= SLO | x naive "
           "| accuracy |", "|---|---|---|---|---|---|---|"]  # fmt: skip

    def f(r: dict[str, Any], k: str, spec: str) -> str:
        return format(r[k], spec) if isinstance(r.get(k), (int, float)) else "-"

    for r in rows:
        out.append(
            f"| {r['engine']} {r['precision']} | {f(r, 'b1_p50_ms', '.1f')} / "
            f"{f(r, 'b1_p99_ms', '.1f')} | {f(r, 'max_rps', '.1f')} | "
            f"{f(r, 'max_rps_vs_naive', '.2f')} | {f(r, 'slo_rps', '.1f')} | "
            f"{f(r, 'slo_rps_vs_naive', '.2f')} | {f(r, 'accuracy', '.3f')} |"
        )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--configs", default=CONFIGS, help="engine:precision,... (naive = anchor)")
    p.add_argument("--seconds", type=float, default=10.0, help="per load phase")
    p.add_argument("--clients", type=int, default=32, help="closed-loop clients (saturation)")
    p.add_argument("--unloaded", type=int, default=50, help="sequential batch-1 requests")
    p.add_argument("--max-requests", type=int, default=5000, help="cap per load phase")
    p.add_argument("--eval-rows", type=int, default=200, help="eval rows for accuracy")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument(
        "--slo-ms",
        type=float,
        default=0.0,
        help="also find the highest open-loop rate with p99 <= this (bisection)",
    )
    p.add_argument("--slo-steps", type=int, default=5, help="--slo-ms: bisection steps")
    p.add_argument("--json", help="write the rows here")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="all servers at once: alternating batch-1 requests and throughput "
        "windows (ratios on a shared machine); no open-loop or accuracy phase",
    )
    p.add_argument("--window", type=float, default=4.0, help="--interleave: seconds per window")
    p.add_argument("--cycles", type=int, default=3, help="--interleave: windows per server")
    p.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.naive_server:
        import uvicorn

        uvicorn.run(naive_app(args.run_dir), host="127.0.0.1", port=args.port,
                    log_level="warning")  # fmt: skip
        return 0
    texts, labels = eval_rows(args.run_dir, args.eval_rows)
    if args.interleave:
        rows = asyncio.run(interleaved(args, args.configs.split(","), texts))
        for row in rows:
            print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    rows = []
    for spec in args.configs.split(","):
        engine, precision = spec.split(":")
        try:
            row = asyncio.run(measure(args, engine, precision, texts, labels))
        except Exception as exc:  # one broken config must not lose the others' figures
            row = {"engine": engine, "precision": precision, "error": f"{exc}"[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    anchor = next((r for r in rows if r.get("engine") == "naive" and "max_rps" in r), None)
    if anchor is not None:
        for r in rows:
            if "max_rps" in r:
                r["max_rps_vs_naive"] = r["max_rps"] / anchor["max_rps"]
            if r.get("slo_rps") is not None and anchor.get("slo_rps"):
                r["slo_rps_vs_naive"] = r["slo_rps"] / anchor["slo_rps"]
    print(summary(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
