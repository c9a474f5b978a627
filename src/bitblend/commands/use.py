"""Commands that use a finished run: eval, predict, generate, bench-infer, serve, export."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bitblend.commands.common import check_finite, column_overrides, user_json
from bitblend.errors import BitblendError


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a finished run on its eval split or on --data."""
    from rich.console import Console

    from bitblend.report.console import metrics_table
    from bitblend.runs.evaluate import evaluate_run
    from bitblend.runs.load import load_run

    columns = column_overrides(args)
    if any(v is not None for v in columns.values()) and not args.data:
        raise BitblendError(
            "--text-column/--label-column/--image-column/--feature-columns: name the columns "
            "of --data FILE; without --data the run's own eval split is used"
        )
    run = load_run(Path(args.run_dir))
    if args.task is not None:
        run.task(args.task)  # an unknown --task is an error, not silently no rows
    results = evaluate_run(run, Path(args.data) if args.data else None, args.task, columns)
    if args.json:
        print(user_json(results))
    else:
        Console().print(metrics_table(f"eval {args.run_dir}", results))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict labels or values for a JSONL/CSV/Parquet file of texts."""
    from bitblend.runs.evaluate import predict_file
    from bitblend.runs.load import load_run

    out_path = Path(args.output) if args.output else None
    if out_path is not None and out_path.exists():
        raise BitblendError(f"--output {out_path}: already exists; choose another path")
    run = load_run(Path(args.run_dir), args.precision)
    rows = predict_file(run, Path(args.input), args.task, column_overrides(args))
    check_finite(rows, Path(args.input))
    if out_path is None:
        sys.stdout.write("".join(user_json(r, None) + "\n" for r in rows))
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        out_path.write_text(text, encoding="utf-8")
        print(f"{len(rows)} predictions -> {out_path}", file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Sample text from a finished run's causal_lm head."""
    from bitblend.runs.generate import Sampling, generate

    sampling = Sampling(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    text, _ = generate(Path(args.run_dir), args.prompt, sampling, args.task)
    print(args.prompt + text)
    return 0


def cmd_bench_infer(args: argparse.Namespace) -> int:
    """Latency p50/p99, throughput and accuracy of a run per serving precision."""
    from rich.console import Console
    from rich.table import Table

    from bitblend.bench.infer import bench_infer
    from bitblend.runs.serving import check_serving

    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    for p in precisions:
        check_serving(p)
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        msg = f"--batch-sizes {args.batch_sizes}: expected integers like 1,32"
        raise BitblendError(msg) from None
    if args.iters < 1 or any(b < 1 for b in sizes):
        raise BitblendError("--iters and --batch-sizes: expected integers >= 1")
    rows = bench_infer(Path(args.run_dir), precisions, sizes, args.iters, args.task)
    if args.json:
        print(user_json(rows))
        return 0
    table = Table(title=f"bench-infer {args.run_dir}")
    for col in ("precision", "batch", "p50 ms", "p99 ms", "examples/s", "accuracy", "agree",
                "weights MiB"):  # fmt: skip
        table.add_column(col, justify="left" if col == "precision" else "right")
    for r in rows:
        table.add_row(
            r["resolved"], str(r["batch_size"]), f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
            f"{r['examples_per_s']:.1f}", f"{r['accuracy']:.3f}", f"{r['agreement']:.3f}",
            f"{r['weight_bytes'] / 2**20:.1f}",
        )  # fmt: skip
    Console().print(table)
    return 0


def serve_environment() -> None:
    """Thread settings of `bitblend serve`, set before torch (and tokenizers) load."""
    # The batcher tokenises many rows at once, which starts the tokenizers' Rust thread
    # pool; its spinning threads fight torch's for the cores (measured on 2 cores: 12 vs 93
    # requests/s for the bbc run). Batching already gives the parallelism.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torch's OpenMP threads busy-wait at every barrier by default; when a core is also
    # needed by the event loop, the HTTP work or another process, a spinning thread holds
    # it while its partner waits to be scheduled. Measured on 2 shared cores (load ~20):
    # MiniLM batch-1 forward 3.2 s with 2 spinning threads, 104 ms with PASSIVE, 137 ms
    # with 1 thread. OpenMP reads it once, when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a finished run over HTTP with dynamic batching (torch or ONNX Runtime)."""
    from bitblend.serve.app import ServeOptions
    from bitblend.serve.server import bind, default_engine, load_engine, serve

    if min(args.max_batch, args.max_queue, args.max_body_kib) < 1 or args.max_wait_ms < 0:
        raise BitblendError(
            "--max-batch, --max-queue, --max-body-kib: expected >= 1; --max-wait-ms: >= 0"
        )
    root = Path(args.image_root) if args.image_root else None
    if root is not None and not root.is_dir():
        raise BitblendError(f"--image-root {root}: not a directory")
    sock = bind(args.host, args.port)  # before the (slow) load: a taken port fails at once
    engine, precision, why = args.engine, args.precision, ""
    if engine == "auto" and precision == "run":
        run, engine, precision, why = default_engine(Path(args.run_dir))
        why = f"; auto: {why}"
    else:
        run = load_engine(Path(args.run_dir), args.precision, args.engine)
    options = ServeOptions(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_body_bytes=args.max_body_kib * 1024, image_root=root,
    )  # fmt: skip
    host, port = sock.getsockname()[:2]
    engine = "torch" if engine == "auto" else engine
    note = f"serving {args.run_dir} ({engine}, {precision}{why}) on http://{host}:{port}"
    return serve(run, sock, options, note)


def cmd_export(args: argparse.Namespace) -> int:
    """Export a transformer run to ONNX (one graph per task), checked against torch."""
    from bitblend.runs.load import load_transformer_run
    from bitblend.serve.onnx import export_onnx

    run_dir = Path(args.run_dir)
    run = load_transformer_run(run_dir, "fp32", needed_by="export")
    out = Path(args.out) if args.out else run_dir / "onnx"
    manifest = export_onnx(run, out, int8=args.int8)
    for task, e in manifest["tasks"].items():
        fused = ", ".join(f"{op} x{n}" for op, n in e.get("fused", {}).items())
        print(f"{task}: fused {fused}" if fused else f"{task}: no transformer fusion")
        for kind in ("fp32", "int8"):
            if kind in e:
                print(
                    f"{task} {kind}: {out / e[kind]}  max probability difference vs torch "
                    f"{e[kind + '_max_prob_diff']:.2e} on {e['check_rows']} eval rows, "
                    f"labels agree {e[kind + '_label_agreement']:.1%}"
                )
    return 0
