"""Commands that combine runs: ensemble, merge, distill."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bitblend.commands.common import user_json
from bitblend.errors import BitblendError


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
        print(user_json(report))
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
