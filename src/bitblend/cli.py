"""The `bitblend` command: train | eval | predict | validate | estimate | recipes.

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


def _quiet_libraries() -> None:
    # transformers/datasets print load reports and download bars meant for hub use; a
    # bitblend run reports what matters itself. Offline: nothing is fetched from a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cmd_train(args: argparse.Namespace) -> int:
    """Train a recipe (the built-in `demo` when none is given)."""
    from rich.console import Console

    from bitblend.config.load import apply_overrides, load_recipe, read_yaml, recipe_from_dict
    from bitblend.train.run_dir import check_new_run_dir, check_resume_dir, default_run_dir
    from bitblend.train.trainer import Trainer

    console = Console(stderr=False)
    if args.resume:
        if args.recipe or args.out:
            raise BitblendError("--resume RUN_DIR: give no RECIPE or --out (the run has both)")
        run_dir = Path(args.resume)
        check_resume_dir(run_dir)
        source = str(run_dir / "recipe.yaml")
        data = apply_overrides(read_yaml(run_dir / "recipe.yaml"), args.set)
        recipe = recipe_from_dict(data, source)
    else:
        recipe = load_recipe(args.recipe, args.set)
        run_dir = Path(args.out) if args.out else default_run_dir(recipe.name)
        check_new_run_dir(run_dir)
    trainer = Trainer(
        recipe, run_dir, resume=bool(args.resume), console=console, show_progress=not args.quiet
    )
    trainer.fit()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a finished run on its eval split or on --data."""
    from rich.console import Console

    from bitblend.inference import evaluate_run, load_run
    from bitblend.report.console import metrics_table

    run = load_run(Path(args.run_dir))
    results = evaluate_run(run, Path(args.data) if args.data else None, args.task)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        Console().print(metrics_table(f"eval {args.run_dir}", results))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict labels or values for a JSONL/CSV/Parquet file of texts."""
    from bitblend.inference import load_run, predict_file

    out_path = Path(args.output) if args.output else None
    if out_path is not None and out_path.exists():
        raise BitblendError(f"--output {out_path}: already exists; choose another path")
    run = load_run(Path(args.run_dir))
    rows = predict_file(run, Path(args.input), args.task)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if out_path is None:
        sys.stdout.write(text)
    else:
        out_path.write_text(text)
        print(f"{len(rows)} predictions -> {out_path}", file=sys.stderr)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a recipe without running it."""
    from bitblend.config.load import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    tasks = ", ".join(f"{t.name} ({t.head})" for t in recipe.tasks)
    print(f"{args.recipe}: ok - {recipe.model.backbone}, {recipe.precision.recipe}, tasks: {tasks}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    """Memory, FLOPs and time per step of a recipe under each precision, before running it."""
    import torch
    from rich.console import Console

    from bitblend.config.load import load_recipe
    from bitblend.estimate import estimate_recipe
    from bitblend.estimate.probe import get_peaks
    from bitblend.estimate.report import render, to_json
    from bitblend.train.setup import pick_device

    if args.ranks < 1:
        raise BitblendError(f"--ranks {args.ranks}: expected an integer >= 1")
    recipe = load_recipe(args.recipe, args.set)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)  # the probe measures what train will use
    device = pick_device(recipe.train.device)
    peaks = get_peaks(device, refresh=args.reprobe)
    est = estimate_recipe(recipe, precision=args.precision, ranks=args.ranks, peaks=peaks)
    if args.json:
        print(json.dumps(to_json(est), indent=2))
    else:
        render(est, Console())
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
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a finished run")
    e.add_argument("run_dir")
    e.add_argument("--data", help="CSV/JSONL/Parquet file with text and label columns")
    e.add_argument("--task", help="task name (needed with --data when the run has several)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="predict with a finished run")
    pr.add_argument("run_dir")
    pr.add_argument("--input", required=True, help="JSONL/CSV/Parquet file with a text column")
    pr.add_argument("--output", help="JSONL file to write (default: stdout)")
    pr.add_argument("--task", help="task name (needed when the run has several)")
    pr.set_defaults(func=cmd_predict)

    v = sub.add_parser("validate", help="check a recipe without running it")
    v.add_argument("recipe")
    overrides(v)
    v.set_defaults(func=cmd_validate)

    es = sub.add_parser("estimate", help="memory, FLOPs and time per step, per precision")
    es.add_argument("recipe", nargs="?", help="recipe file or built-in name (default: demo)")
    overrides(es)
    es.add_argument(
        "--precision",
        default="all",
        help="all (every recipe + what-if rows), recipe (the recipe's own), or one of "
        "32-true, bf16-mixed, 16-mixed, bf16-true",
    )
    es.add_argument("--ranks", type=int, default=1, help="per-rank memory for N DDP/FSDP2 ranks")
    es.add_argument("--json", action="store_true", help="print JSON instead of tables")
    es.add_argument("--reprobe", action="store_true", help="measure this machine's peaks again")
    es.set_defaults(func=cmd_estimate)

    r = sub.add_parser("recipes", help="list the built-in recipes")
    r.add_argument("--fields", action="store_true", help="list every recipe key with its doc")
    r.add_argument("--markdown", action="store_true", help="with --fields: as a Markdown table")
    r.set_defaults(func=cmd_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `bitblend` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("default", UserWarning)
    _quiet_libraries()
    try:
        return int(args.func(args))
    except BitblendError as exc:
        if args.debug:
            raise
        msg = " ".join(str(exc).split())  # always exactly one line
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
