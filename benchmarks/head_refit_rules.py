"""The head refit's choice of L2 strength on a finished run: best CV mean vs the 1-SE rule.

For each task the refit covers (`--mode`), the saved model's pooled features (and a
shortcut's raw inputs) are taken once on the training rows the refit uses and on the eval
rows the run scores; the readout is fitted with each rule of `train/head_refit.choose_c`
and scored on the eval rows. The refit itself is the trainer's (`fit_readout`), so a rule's
row here is what `train.head_refit` would give the run with that rule.

    PYTHONPATH=src python benchmarks/head_refit_rules.py RUN_DIR [RUN_DIR ...] [--mode all]
        [--tasks digits,breast_cancer]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from bitblend.config.load import read_yaml, recipe_from_dict
from bitblend.models.trunk import load_model
from bitblend.train import head_refit as hr
from bitblend.train.trainer import Trainer

RULES = ("best", "1se")


def rules_of_run(run: Path, mode: str, only: list[str] | None) -> dict[str, dict[str, float]]:
    """Per refitted task: eval accuracy and chosen C under each rule."""
    recipe = recipe_from_dict(read_yaml(run / "recipe.yaml"))
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(recipe, Path(tmp) / "run", show_progress=False)
        saved, _, _ = load_model(run / "model")
        trainer.model.load_state_dict(saved.state_dict(), strict=True)
        model, seed = trainer.model, recipe.train.seed
        for t in trainer.tasks:
            if hr.skip_reason(model, t.name, mode, sharded=False) is not None:
                continue
            if only and t.name not in only:
                continue
            rows = hr.refit_rows(len(t.train), seed)  # the rows refit_task fits
            limit = recipe.train.eval_max_examples or len(t.eval)
            erows = np.arange(min(len(t.eval), limit))
            x = hr.pooled_features(model, t.name, t.train, t.batch, rows)
            xe = hr.pooled_features(model, t.name, t.eval, t.batch, erows)
            y = np.asarray(t.train.targets)[rows].astype(np.int64)
            ye = np.asarray(t.eval.targets)[erows].astype(np.int64)
            rec: dict[str, float] = {"train_rows": len(rows), "eval_rows": len(erows)}
            for rule in RULES:
                fit = hr.fit_readout(x, y, seed, rule)
                z = xe @ fit["coef"].T + fit["intercept"]
                pred = fit["classes"][(z[:, 0] > 0).astype(int)] if z.shape[1] == 1 else (
                    fit["classes"][z.argmax(1)])  # fmt: skip
                rec[f"{rule}_accuracy"] = round(float(np.mean(pred == ye)), 4)
                rec[f"{rule}_C"] = fit["C"]
            out[t.name] = rec
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="finished run directories")
    ap.add_argument("--mode", choices=["auto", "all"], default="auto")
    ap.add_argument("--tasks", help="comma-separated task names (default: every refitted)")
    args = ap.parse_args()
    only = args.tasks.split(",") if args.tasks else None
    for run in args.runs:
        rows = rules_of_run(run, args.mode, only)
        print(json.dumps({"run": str(run), "tasks": rows}), flush=True)


if __name__ == "__main__":
    main()
