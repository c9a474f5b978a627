"""What `train.head_refit` does to a finished run: its saved model, its own recipe and splits.

Rebuilds the run's tasks exactly as `train` did (same seed, same train/eval rows), loads the
saved model, refits the heads with train/head_refit.py and prints each task's eval accuracy
with the trained head and with the refitted one, the chosen C and the refit's seconds.
Useful on runs made with `head_refit: off` or before it existed (docs/mixing.md, "Head
refit").

    PYTHONPATH=src python benchmarks/head_refit.py RUN_DIR [--mode auto|all]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from rich.console import Console

from bitblend.config.load import read_yaml, recipe_from_dict
from bitblend.models.trunk import load_model
from bitblend.train.head_refit import run_head_refit
from bitblend.train.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished run directory")
    ap.add_argument("--mode", choices=["auto", "all"], default="all")
    args = ap.parse_args()
    recipe = recipe_from_dict(read_yaml(args.run / "recipe.yaml"))
    cfg = dataclasses.replace(recipe.train, head_refit=args.mode)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(recipe, Path(tmp) / "run", show_progress=False)
        saved, _, _ = load_model(args.run / "model")
        trainer.model.load_state_dict(saved.state_dict(), strict=True)
        done = run_head_refit(trainer.model, trainer.tasks, cfg, trainer.dist, Console())
        after = trainer.evaluate()
    rows = {
        name: {
            "before": round(r["eval_before"]["accuracy"], 4),
            "after": round(after[name]["accuracy"], 4),
            "C": r["C"],
            "cv_accuracy": round(r["cv_accuracy"], 4),
            "seconds": round(r["seconds"], 1),
        }
        for name, r in (done or {}).items()
        if "skipped" not in r
    }
    print(json.dumps({"run": str(args.run), "mode": args.mode, "tasks": rows}))


if __name__ == "__main__":
    main()
