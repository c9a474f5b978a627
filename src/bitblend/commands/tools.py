"""Commands that check, price or describe without training: validate, estimate, doctor,
recipes, report, bench."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bitblend.commands.common import user_json
from bitblend.errors import BitblendError


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
    peaks = get_peaks(device, refresh=args.reprobe, now=True)
    # the runtime a train process holds before its model, measured in a child (estimate/
    # runtime.py); BITBLEND_ESTIMATE_RUNTIME=self takes this process's RSS instead
    how = os.environ.get("BITBLEND_ESTIMATE_RUNTIME", "measure")
    est = estimate_recipe(
        recipe, precision=args.precision, ranks=args.ranks, peaks=peaks, runtime=how
    )
    if args.json:
        print(user_json(to_json(est)))
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
        print(user_json(report.to_json()))
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
