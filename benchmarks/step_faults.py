"""Wall time and page faults of every step and evaluation of one run: where a short run's
time goes on a machine whose first-touched pages are dear (a VM whose host backs guest
memory lazily: 2-30 us a page here, docs/estimate.md).

    .venv/bin/python benchmarks/step_faults.py user:four-task-mixture [--set K=V ...]
    .venv/bin/python benchmarks/step_faults.py bbc --set model.backbone=minilm
        [--no-release]   # the heap's free pages are not given back before the first evaluation

`user:CASE` is one of benchmarks/estimate_vs_measured.py's users' recipes (their files
written to a temporary directory). Prints one line per step and per evaluation (seconds,
minor faults), then the run's train time and peak RSS.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any


def timed(label: str, fn: Any) -> Any:
    def wrapper(self: Any) -> Any:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        try:
            return fn(self)
        finally:
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            print(f"{label:5} {time.perf_counter() - t0:7.3f} s  faults "
                  f"{r1.ru_minflt - r0.ru_minflt:7d}  user {r1.ru_utime - r0.ru_utime:6.2f} s  "
                  f"sys {r1.ru_stime - r0.ru_stime:6.2f} s", flush=True)  # fmt: skip

    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="a recipe, or user:CASE")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--no-release", action="store_true", help="keep the heap's free pages")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import bitblend.train.trainer as trainer
    from bitblend.config.load import apply_overrides, load_recipe, recipe_from_dict
    from bitblend.procmem import peak_rss_bytes

    trainer.Trainer.train_step = timed("step", trainer.Trainer.train_step)  # type: ignore[method-assign]
    trainer.Trainer.evaluate = timed("eval", trainer.Trainer.evaluate)  # type: ignore[method-assign]
    if args.no_release:
        trainer.release_free_pages = lambda: False  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as tmp:
        if args.recipe.startswith("user:"):
            sys.path.insert(0, str(Path(__file__).parent))
            from estimate_vs_measured import user_recipe

            data = apply_overrides(user_recipe(args.recipe[5:], Path(tmp)), args.set)
            recipe = recipe_from_dict(data)
        else:
            recipe = load_recipe(args.recipe, args.set)
        summary = trainer.Trainer(recipe, Path(tmp) / "run", show_progress=False).fit()
    print(
        f"train_time_s {summary['train_time_s']:.2f}  peak RSS {peak_rss_bytes() / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
