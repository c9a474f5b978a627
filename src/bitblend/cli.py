"""The `bitblend` command: train | eval | predict | ensemble | merge | distill | ...

Bad input (recipe, data, paths) ends in one line on stderr and exit code 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import NoReturn

from bitblend.commands.combine import cmd_distill, cmd_ensemble, cmd_merge
from bitblend.commands.common import quiet_libraries
from bitblend.commands.tools import (
    cmd_bench,
    cmd_doctor,
    cmd_estimate,
    cmd_recipes,
    cmd_report,
    cmd_validate,
)
from bitblend.commands.train import cmd_train
from bitblend.commands.use import (
    cmd_bench_infer,
    cmd_eval,
    cmd_export,
    cmd_generate,
    cmd_predict,
    cmd_serve,
    serve_environment,
)
from bitblend.errors import BitblendError

EXIT_USAGE = 2
MAX_MESSAGE = 1000  # characters of an error line


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
                    help="auto (the fastest within 0.5 points of fp32's eval accuracy: "
                         "onnxruntime int8, else torch bf16, else torch in the run's "
                         "precision), torch or onnxruntime (exports to RUN_DIR/onnx/ if "
                         "missing)")  # fmt: skip
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
    code = _main(argv)
    # A torchrun rank ends here, with its group left, before the interpreter's shutdown
    # can abort it (train/distributed.py `exit_rank`); loaded only if a command used it.
    dist = sys.modules.get("bitblend.train.distributed")
    if dist is not None:
        dist.exit_rank(code)
    return code


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for `train --nproc`
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("default", UserWarning)
    if args.func is cmd_serve:
        serve_environment()  # before quiet_libraries imports transformers (and torch)
    quiet_libraries()
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
