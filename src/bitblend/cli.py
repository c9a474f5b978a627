"""The `bitblend` command: train | eval | predict | ensemble | merge | distill | ...

Bad input (recipe, data, paths) ends in one line on stderr and exit code 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from bitblend.errors import BitblendError

EXIT_USAGE = 2
MAX_MESSAGE = 1000  # characters of an error line

# Each command imports what it uses inside its function: torch, transformers and
# scikit-learn take seconds to import, and `bitblend --help`, `recipes` or a one-line
# argument error must not pay for every command's dependencies.


def _quiet_libraries() -> None:
    # transformers/datasets print load reports and download bars meant for hub use; a
    # bitblend run reports what matters itself. Offline: nothing is fetched from a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # torchao / bitsandbytes log at import about GPU kernels a CPU build lacks.
    for name in ("torchao", "bitsandbytes", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _json(data: object, indent: int | None = 2) -> str:
    """JSON for users to read: UTF-8 text (Chinese labels as characters, not \\u escapes),
    escaped only where stdout cannot encode it."""
    encoding = (getattr(sys.stdout, "encoding", None) or "utf-8").lower().replace("-", "")
    return json.dumps(data, indent=indent, ensure_ascii=not encoding.startswith("utf"))


def _check_finite(rows: list[dict[str, object]], source: Path) -> None:
    """Predictions never carry NaN/inf into JSON (which standard JSON cannot even hold)."""
    import math

    def bad(v: object) -> bool:
        if isinstance(v, float):
            return not math.isfinite(v)
        if isinstance(v, dict):
            return any(bad(x) for x in v.values())
        return isinstance(v, list) and any(bad(x) for x in v)

    for i, row in enumerate(rows, 1):
        if bad(row):
            raise BitblendError(
                f"--input {source}: row {i}: the model's output is not finite (NaN or inf); the "
                "run's weights or this row's inputs hold inf/NaN, nothing was written"
            )


def cmd_train(args: argparse.Namespace) -> int:
    """Train a recipe (the built-in `demo` when none is given)."""
    import contextlib

    from rich.console import Console

    from bitblend.config.classic import CLASSIC, is_classic
    from bitblend.config.load import load_recipe
    from bitblend.config.resume import resume_recipe
    from bitblend.config.schema import Recipe
    from bitblend.device import pick_device
    from bitblend.train import distributed
    from bitblend.train.lock import RunLock
    from bitblend.train.resume import TrainingStopped, resume_hint, stop_on_sigterm
    from bitblend.train.run_dir import check_new_run_dir, check_resume_dir, default_run_dir
    from bitblend.train.trainer import Trainer

    console = Console(stderr=False)
    if args.nproc is not None:
        return _launch(args)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts and args.out and not args.resume and (Path(args.out) / "recipe.yaml").is_file():
        # torchrun --max-restarts: a restarted worker continues the run it was started for.
        args.resume, args.recipe, args.out = args.out, None, None
    changed: dict[str, list[object]] = {}
    recipe: Recipe | None = None
    if args.resume:
        if args.recipe or args.out:
            raise BitblendError("--resume RUN_DIR: give no RECIPE or --out (the run has both)")
        run_dir = Path(args.resume)
        check_resume_dir(run_dir)
    else:
        recipe = load_recipe(args.recipe, args.set)
        run_dir = Path(args.out) if args.out else default_run_dir(recipe.name)
        check_new_run_dir(run_dir)  # before the lock creates anything (again under it)
    # One writer per run directory, decided before reading or writing anything in it (a
    # second `train` on a running --out is told who holds it, not that it is not empty).
    # Under torchrun rank 0 holds it for the job (every rank writing would lock itself out).
    first = int(os.environ.get("RANK", "0")) == 0
    flag = "--resume" if args.resume else "--out"
    lock = RunLock(run_dir, flag) if first else contextlib.nullcontext()
    # SIGTERM -> checkpoint and stop is for one process. Under torchrun the agent sends it to
    # every worker when a peer died or the job is stopped, and waits for them to exit before
    # a restart: a worker that deferred it would sit in a collective with a dead peer.
    sigterm = (
        stop_on_sigterm() if "TORCHELASTIC_RUN_ID" not in os.environ else contextlib.nullcontext()
    )
    with lock, sigterm:
        if recipe is None:
            # Only keys outside the checkpoint's state may change (config/resume.py).
            recipe, changed = resume_recipe(run_dir, args.set)
        else:
            check_new_run_dir(run_dir)
        if is_classic(recipe):  # scikit-learn, not the torch loop
            from bitblend.ensemble.classic import train_classic

            if args.resume:
                raise BitblendError(f"--resume {run_dir}: a {CLASSIC} run fits in one pass")
            train_classic(recipe, run_dir, console)
            return 0
        if args.resume and (run_dir / "distill.json").is_file():
            raise BitblendError(
                f"--resume {run_dir}: a distilled run; use bitblend distill --resume"
            )
        # Under torchrun every rank must agree on the run directory (the default one has the
        # time in its name) and must have checked it before rank 0 creates it.
        ctx = distributed.init(recipe.distributed, pick_device(recipe.train.device).type)
        run_dir = Path(ctx.broadcast(str(run_dir)))
        ctx.barrier()
        try:
            trainer = Trainer(
                recipe, run_dir, resume=bool(args.resume), console=console,
                show_progress=not args.quiet, overrides=args.set, changed=changed,
            )  # fmt: skip
            trainer.fit()
        except TrainingStopped as stop:  # SIGTERM: saved, now say how to go on
            print(f"bitblend: {stop}", file=sys.stderr)
            return stop.code
        except KeyboardInterrupt:
            print(f"bitblend: interrupted; resume with: {resume_hint(run_dir)}", file=sys.stderr)
            return 130
        except RuntimeError as exc:  # a collective failed: a peer died or passed the timeout
            if ctx.world_size == 1 or args.debug or not distributed.is_collective_failure(exc):
                raise
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            print(
                f"bitblend: error: rank {ctx.rank} of {ctx.world_size}: a collective failed "
                f"({line}); another rank died or stalled past distributed.timeout_s "
                f"({recipe.distributed.timeout_s:g}s)",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)  # no teardown: destroying a group with a dead peer can block
        distributed.teardown()
    return 0


def _launch(args: argparse.Namespace) -> int:
    """`bitblend train ... --nproc N`: validate here, then exec torchrun on this machine."""
    from bitblend.config.load import load_recipe
    from bitblend.train.distributed import check_recipe, resolve_strategy
    from bitblend.train.run_dir import check_new_run_dir, check_resume_dir, default_run_dir

    if args.nproc < 1:
        raise BitblendError(f"--nproc {args.nproc}: expected an integer >= 1")
    argv = _strip_nproc(list(args.argv))
    if args.resume:
        check_resume_dir(Path(args.resume))
    else:
        recipe = load_recipe(args.recipe, args.set)
        strategy = resolve_strategy(recipe.distributed.strategy, args.nproc)
        check_recipe(recipe, strategy, args.nproc)
        if not args.out:  # one name for all ranks (and for torchrun --max-restarts)
            out = default_run_dir(recipe.name)
            argv += ["--out", str(out)]
            check_new_run_dir(out)
        else:
            check_new_run_dir(Path(args.out))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.nproc}", "-m", "bitblend", *argv]  # fmt: skip
    sys.stdout.flush()
    os.execv(sys.executable, cmd)
    return 0  # not reached


def _strip_nproc(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _columns(args: argparse.Namespace) -> dict[str, object]:
    """--text-column and friends as task keys (None: the run's own column names)."""
    feats = getattr(args, "feature_columns", None)
    return {
        "text_column": getattr(args, "text_column", None),
        "label_column": getattr(args, "label_column", None),
        "image_column": getattr(args, "image_column", None),
        "audio_column": getattr(args, "audio_column", None),
        "feature_columns": [c.strip() for c in feats.split(",") if c.strip()] if feats else None,
    }


def _column_options(sp: argparse.ArgumentParser, labelled: bool) -> None:
    """Options naming a user file's columns when they differ from the run's recipe."""
    sp.add_argument("--text-column", metavar="NAME", help="column with the text (default: the "
                    "run's tasks[i].text_column)")  # fmt: skip
    if labelled:
        sp.add_argument("--label-column", metavar="NAME", help="column with the label "
                        "(default: the run's tasks[i].label_column)")  # fmt: skip
    sp.add_argument("--image-column", metavar="NAME", help="column with image file paths")
    sp.add_argument("--audio-column", metavar="NAME", help="column with audio file paths")
    sp.add_argument(
        "--feature-columns", metavar="A,B,...", help="comma-separated numeric feature columns"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a finished run on its eval split or on --data."""
    from rich.console import Console

    from bitblend.report.console import metrics_table
    from bitblend.runs.evaluate import evaluate_run
    from bitblend.runs.load import load_run

    columns = _columns(args)
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
        print(_json(results))
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
    rows = predict_file(run, Path(args.input), args.task, _columns(args))
    _check_finite(rows, Path(args.input))
    if out_path is None:
        sys.stdout.write("".join(_json(r, None) + "\n" for r in rows))
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
        print(_json(rows))
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


def _serve_environment() -> None:
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
        for kind in ("fp32", "int8"):
            if kind in e:
                print(
                    f"{task} {kind}: {out / e[kind]}  max probability difference vs torch "
                    f"{e[kind + '_max_prob_diff']:.2e} on {e['check_rows']} eval rows, "
                    f"labels agree {e[kind + '_label_agreement']:.1%}"
                )
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    """Combine finished runs that share a task's label space; save the ensemble spec."""
    import time

    from rich.console import Console

    from bitblend.ensemble.spec import build_ensemble, render_report
    from bitblend.runs.spec import DataSplit

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"ensemble-{args.method}-{stamp}"
    val = Path(args.val_data) if args.val_data else None
    split = DataSplit(Path(args.data), val, args.val_fraction, args.seed)
    runs = [Path(d) for d in args.run_dirs]
    report = build_ensemble(runs, args.method, split, args.task, out, args.calibrate_members)
    if args.json:
        print(_json(report))
    else:
        # Piped output would be cut to 80 columns; the table is the point of the command.
        render_report(report, Console() if sys.stdout.isatty() else Console(width=160))
        print(f"ensemble spec -> {out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge the weights of runs fine-tuned from one backbone into a new run directory."""
    import time

    from rich.console import Console

    from bitblend.ensemble.merge import MergeOptions, run_merge

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"merge-{args.method}-{stamp}"
    data = Path(args.data) if args.data else None
    opt = MergeOptions(args.method, data, args.task, args.scale, args.density)
    run_merge([Path(d) for d in args.run_dirs], opt, out, Console())
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """Train a student recipe on a teacher's (run or ensemble) softened outputs."""
    from rich.console import Console

    from bitblend.config.load import apply_overrides, load_recipe, read_yaml, recipe_from_dict
    from bitblend.ensemble.distill import resume_settings, run_distill
    from bitblend.train.run_dir import check_new_run_dir, check_resume_dir, default_run_dir

    if args.resume:
        if args.teacher or args.student or args.out:
            raise BitblendError("--resume RUN_DIR: give no --teacher, --student or --out")
        run_dir = Path(args.resume)
        check_resume_dir(run_dir)
        info = resume_settings(run_dir)
        data = apply_overrides(read_yaml(run_dir / "recipe.yaml"), args.set)
        recipe = recipe_from_dict(data, str(run_dir / "recipe.yaml"))
        teacher, temperature, alpha = Path(info["teacher"]), info["temperature"], info["alpha"]
    else:
        if not args.teacher or not args.student:
            raise BitblendError("distill: --teacher RUN_OR_ENSEMBLE and --student RECIPE needed")
        recipe = load_recipe(args.student, args.set)
        run_dir = Path(args.out) if args.out else default_run_dir(f"{recipe.name}-distilled")
        check_new_run_dir(run_dir)
        teacher, temperature, alpha = Path(args.teacher), args.temperature, args.alpha
    run_distill(
        teacher,
        recipe,
        run_dir,
        temperature=temperature,
        alpha=alpha,
        resume=bool(args.resume),
        console=Console(),
        show_progress=not args.quiet,
    )
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a recipe, its data, backbone and tokenizer without training (seconds)."""
    import time

    from bitblend.config.classic import is_classic
    from bitblend.config.load import load_recipe

    t0 = time.perf_counter()
    recipe = load_recipe(args.recipe, args.set)
    tasks = ", ".join(f"{t.name} ({t.head})" for t in recipe.tasks)
    head = f"{recipe.model.backbone}, {recipe.precision.recipe}, tasks: {tasks}"
    if args.schema_only:
        print(f"{args.recipe}: ok (schema only) - {head}")
        return 0
    if is_classic(recipe):
        from bitblend.taskspec import load_data

        load_data(recipe)  # a scikit-learn run: its data is all there is to check
        lines = [f"{t.name}: data ok" for t in recipe.tasks]
        what = "data"
    else:
        from bitblend.train.validate import validate_recipe

        lines = validate_recipe(recipe).tasks
        what = "data, backbone, tokenizer, shapes"
    took = time.perf_counter() - t0
    print(f"{args.recipe}: ok - {head} ({what} checked in {took:.1f}s)")
    for line in lines:
        print(f"  {line}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    """Memory, FLOPs and time per step of a recipe under each precision, before running it."""
    import torch
    from rich.console import Console

    from bitblend.config.classic import CLASSIC, is_classic
    from bitblend.config.load import load_recipe
    from bitblend.device import pick_device
    from bitblend.estimate import estimate_recipe
    from bitblend.estimate.probe import get_peaks
    from bitblend.estimate.report import render, to_json

    if args.ranks < 1:
        raise BitblendError(f"--ranks {args.ranks}: expected an integer >= 1")
    recipe = load_recipe(args.recipe, args.set)
    if is_classic(recipe):
        raise BitblendError(
            f"model.backbone: {CLASSIC} fits with scikit-learn in seconds; estimate covers "
            "transformer backbones"
        )
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)  # the probe measures what train will use
    device = pick_device(recipe.train.device)
    peaks = get_peaks(device, refresh=args.reprobe)
    # the runtime a train process holds before its model, measured in a child (estimate/
    # runtime.py); BITBLEND_ESTIMATE_RUNTIME=self takes this process's RSS instead
    how = os.environ.get("BITBLEND_ESTIMATE_RUNTIME", "measure")
    est = estimate_recipe(
        recipe, precision=args.precision, ranks=args.ranks, peaks=peaks, runtime=how
    )
    if args.json:
        print(_json(to_json(est)))
    else:
        render(est, Console())
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Dry-run a few batches in fp32 and report per-layer numerics and a precision plan."""
    from rich.console import Console

    from bitblend.config.load import load_recipe
    from bitblend.precision.doctor import render
    from bitblend.train.probe import diagnose

    if args.batches < 1:
        raise BitblendError(f"--batches {args.batches}: expected an integer >= 1")
    report = diagnose(load_recipe(args.recipe, args.set), args.batches)
    if args.json:
        print(_json(report.to_json()))
    else:
        render(report, Console())
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    """List built-in recipes, one line each (or every recipe field with --fields)."""
    from bitblend.config.load import builtin_recipes, field_docs, load_recipe

    if args.fields and args.markdown:
        from bitblend.config.docs import fields_markdown

        sys.stdout.write(fields_markdown())
        return 0
    if args.fields:
        for key, default, text in field_docs():
            print(f"{key} = {default}  # {text}")
        return 0
    for name in builtin_recipes():
        recipe = load_recipe(name)
        print(f"{name:<14} {recipe.description}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write report.html (+ plots/*.png) over one or more run directories."""
    from bitblend.report.html import write_report

    page = write_report([Path(d) for d in args.run_dirs], Path(args.out) if args.out else None)
    print(f"report -> {page}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a suite of short runs (precisions x mixing strategies); table + report."""
    from rich.console import Console

    from bitblend.bench.suite import bench_table, run_suite

    # Piped output would be cut to 80 columns; the table is the point of the command.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    out = Path(args.out) if args.out else None
    result = run_suite(args.suite, out, args.steps, args.set, console)
    console.print(bench_table(result))
    console.print(f"report -> {result.report or 'not written'}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), like every other bitblend error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"bitblend: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    p = _Parser(prog="bitblend", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def overrides(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a recipe key, e.g. train.steps=20 or tasks.0.weight=2",
        )

    t = sub.add_parser("train", help="train a recipe (default: the built-in demo)")
    t.add_argument("recipe", nargs="?", help="recipe file or built-in name (default: demo)")
    overrides(t)
    t.add_argument("--out", help="run directory (default: runs/<recipe>-<time>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue from the latest checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="run N processes on this machine under torchrun (distributed.strategy auto = ddp)",
    )
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a finished run")
    e.add_argument("run_dir")
    e.add_argument("--data", help="CSV/JSONL/Parquet file with text and label columns")
    e.add_argument("--task", help="task name (needed with --data when the run has several)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _column_options(e, labelled=True)
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="predict with a finished run")
    pr.add_argument("run_dir")
    pr.add_argument("--input", required=True, help="JSONL/CSV/Parquet file with a text column")
    pr.add_argument("--output", help="JSONL file to write (default: stdout)")
    pr.add_argument("--task", help="task name (needed when the run has several)")
    pr.add_argument(
        "--precision",
        default="run",
        choices=["run", "fp32", "bf16", "int8"],
        help="serving precision: run (as trained), fp32, bf16, int8 (dynamic, Linear layers)",
    )
    _column_options(pr, labelled=False)
    pr.set_defaults(func=cmd_predict)

    g = sub.add_parser("generate", help="sample text from a run's causal_lm head")
    g.add_argument("run_dir")
    g.add_argument("--prompt", default="", help="text to continue (default: a new document)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add at most")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    g.add_argument("--seed", type=int, default=0, help="same seed, same text")
    g.add_argument("--task", help="causal_lm task name (default: the first)")
    g.set_defaults(func=cmd_generate)

    bi = sub.add_parser("bench-infer", help="inference latency/throughput per precision")
    bi.add_argument("run_dir")
    bi.add_argument("--precision", default="fp32,bf16,int8", help="comma-separated precisions")
    bi.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes")
    bi.add_argument("--iters", type=int, default=20, help="timed calls per batch size")
    bi.add_argument("--task", help="task name (default: the first)")
    bi.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bi.set_defaults(func=cmd_bench_infer)

    sv = sub.add_parser("serve", help="serve a finished run over HTTP (dynamic batching)")
    sv.add_argument("run_dir", help="a run directory or an ensemble spec")
    sv.add_argument("--precision", default="run", choices=["run", "fp32", "bf16", "int8"],
                    help="serving precision (onnxruntime: run/fp32 or int8)")  # fmt: skip
    sv.add_argument("--engine", default="auto", choices=["auto", "torch", "onnxruntime"],
                    help="auto (torch bf16 when its eval accuracy is within 0.5 points of "
                         "fp32, else torch in the run's precision), torch or onnxruntime "
                         "(exports to RUN_DIR/onnx/ if missing)")  # fmt: skip
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    sv.add_argument("--max-batch", type=int, default=32, help="rows per forward at most")
    sv.add_argument("--max-wait-ms", type=float, default=5.0,
                    help="how long the oldest request waits for a batch to fill")  # fmt: skip
    sv.add_argument("--max-queue", type=int, default=256,
                    help="queued requests at most; beyond, 503 with Retry-After")  # fmt: skip
    sv.add_argument("--max-body-kib", type=int, default=8192, help="request body limit (KiB)")
    sv.add_argument("--image-root", help="directory image file paths in requests resolve in")
    sv.set_defaults(func=cmd_serve)

    ex = sub.add_parser("export", help="export a run to ONNX, checked against torch")
    ex.add_argument("run_dir")
    ex.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    ex.add_argument("--int8", action="store_true", help="also a dynamic-int8 graph (ORT)")
    ex.add_argument("--out", help="output directory (default: RUN_DIR/onnx)")
    ex.set_defaults(func=cmd_export)

    en = sub.add_parser("ensemble", help="combine runs sharing a label space into a spec")
    en.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="runs or ensemble specs")
    en.add_argument(
        "--method", choices=("mean", "vote", "weighted", "product", "stack"), default="mean"
    )
    en.add_argument("--data", required=True, help="labelled CSV/JSONL/Parquet file (held out)")
    en.add_argument("--val-data", help="validation file (default: a seeded part of --data)")
    en.add_argument(
        "--val-fraction",
        type=float,
        default=0.5,
        help="share of --data used for fitting when --val-data is not given",
    )
    en.add_argument("--seed", type=int, default=0, help="seed of the validation/test split")
    en.add_argument("--task", help="the shared task (needed when members have several)")
    en.add_argument(
        "--calibrate-members",
        action="store_true",
        help="temperature-scale each member on the validation part before combining",
    )
    en.add_argument("--out", help="spec directory (default: runs/ensemble-<method>-<time>)")
    en.add_argument("--json", action="store_true", help="print the report as JSON")
    en.set_defaults(func=cmd_ensemble)

    mg = sub.add_parser("merge", help="merge weights of runs fine-tuned from one backbone")
    mg.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    mg.add_argument(
        "--method",
        choices=("uniform", "greedy-soup", "task-arithmetic", "ties", "lora-merge"),
        default="uniform",
        help="lora-merge: fold one LoRA run's adapter into its base (a full model)",
    )
    mg.add_argument("--data", help="held-out labelled file (greedy-soup, scale search, eval)")
    mg.add_argument("--task", help="the task scored on --data (needed when runs share several)")
    mg.add_argument(
        "--scale",
        type=float,
        help="task-arithmetic/ties scale (default: searched on --data, else 1/n for "
        "task-arithmetic and 1 for ties)",
    )
    mg.add_argument(
        "--density", type=float, default=0.2, help="ties: share of each task vector kept"
    )
    mg.add_argument("--out", help="run directory (default: runs/merge-<method>-<time>)")
    mg.set_defaults(func=cmd_merge)

    di = sub.add_parser("distill", help="train a student on a teacher's softened outputs")
    di.add_argument("--teacher", metavar="RUN_OR_ENSEMBLE", help="run directory or spec")
    di.add_argument("--student", metavar="RECIPE", help="student recipe file or built-in name")
    overrides(di)
    di.add_argument("--temperature", type=float, default=2.0, help="softening temperature T")
    di.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term")
    di.add_argument("--out", help="run directory (default: runs/<recipe>-distilled-<time>)")
    di.add_argument("--resume", metavar="RUN_DIR", help="continue a distilled run")
    di.add_argument("--quiet", action="store_true", help="no progress bar")
    di.set_defaults(func=cmd_distill)

    v = sub.add_parser(
        "validate", help="check a recipe, its data, backbone and tokenizer without training"
    )
    v.add_argument("recipe")
    overrides(v)
    v.add_argument(
        "--schema-only",
        action="store_true",
        help="check the recipe's keys and types only (reads no data, loads no model)",
    )
    v.set_defaults(func=cmd_validate)

    es = sub.add_parser("estimate", help="memory, FLOPs and time per step, per precision")
    es.add_argument("recipe", nargs="?", help="recipe file or built-in name (default: demo)")
    overrides(es)
    es.add_argument(
        "--precision",
        default="all",
        help="all (every recipe + pure-bf16 / low-bit variant rows), recipe (the recipe's "
        "own), or one of 32-true, bf16-mixed, 16-mixed, bf16-true, fp8-emulated, fp8",
    )
    es.add_argument("--ranks", type=int, default=1, help="per-rank memory for N DDP/FSDP2 ranks")
    es.add_argument("--json", action="store_true", help="print JSON instead of tables")
    es.add_argument("--reprobe", action="store_true", help="measure this machine's peaks again")
    es.set_defaults(func=cmd_estimate)

    dr = sub.add_parser("doctor", help="per-layer numerics of a few batches, precision advice")
    dr.add_argument("recipe", nargs="?", help="recipe file or built-in name (default: demo)")
    overrides(dr)
    dr.add_argument("--batches", type=int, default=2, help="batches per task to measure")
    dr.add_argument("--json", action="store_true", help="print JSON instead of a table")
    dr.set_defaults(func=cmd_doctor)

    r = sub.add_parser("recipes", help="list the built-in recipes")
    r.add_argument("--fields", action="store_true", help="list every recipe key with its doc")
    r.add_argument("--markdown", action="store_true", help="with --fields: as a Markdown table")
    r.set_defaults(func=cmd_recipes)

    rp = sub.add_parser("report", help="report.html with plots over one or more runs")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rp.add_argument("--out", help="directory (default: the run itself, or runs/report-<time>)")
    rp.set_defaults(func=cmd_report)

    b = sub.add_parser("bench", help="short runs per precision x mixing strategy, compared")
    b.add_argument("suite", nargs="?", default="tiny", help="tiny (default, seconds) or demo")
    overrides(b)
    b.add_argument("--out", help="suite directory (default: runs/bench-<suite>-<time>)")
    b.add_argument("--steps", type=int, help="steps per run (default: the suite's)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `bitblend` console script."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for `train --nproc`
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("default", UserWarning)
    if args.func is cmd_serve:
        _serve_environment()  # before _quiet_libraries imports transformers (and torch)
    _quiet_libraries()
    try:
        return int(args.func(args))
    except BitblendError as exc:
        if args.debug:
            raise
        msg = " ".join(str(exc).split())  # always exactly one line
        if len(msg) > MAX_MESSAGE:  # a last guard: messages quote values briefly already
            msg = msg[: MAX_MESSAGE - 3] + "..."
        print(f"bitblend: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("bitblend: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `bitblend ... --json | head` closed our stdout: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
