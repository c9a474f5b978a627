"""`bitblend train` (one process, or N through torchrun with `--nproc`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bitblend.errors import BitblendError


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
