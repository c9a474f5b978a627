"""`load_run`: the one place that tells the kinds of finished run apart.

A directory with ensemble.json is an ensemble spec; one with recipe.yaml is a trained run,
a tfidf-logreg run when its recipe says `model.backbone: tfidf-logreg`, else a transformer
run. Every command that takes a run directory (eval, predict, ensemble, merge, distill,
bench-infer) loads it here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeAlias

from bitblend.config.classic import is_classic
from bitblend.config.load import read_yaml, recipe_from_dict
from bitblend.config.schema import Recipe
from bitblend.errors import BitblendError
from bitblend.runs.serving import check_serving
from bitblend.runs.spec import SPEC_FILE, EnsembleRun, load_ensemble
from bitblend.runs.tfidf import TfidfRun, load_tfidf
from bitblend.runs.transformer import TransformerRun, load_transformer

RunKind = Literal["transformer", "tfidf-logreg", "ensemble"]
Run: TypeAlias = TransformerRun | TfidfRun | EnsembleRun
KIND_NAMES = {
    "transformer": "a transformer run",
    "tfidf-logreg": "a tfidf-logreg run",
    "ensemble": "an ensemble spec",
}


def run_recipe(run_dir: Path) -> Recipe:
    """The recipe of a finished (non-ensemble) run directory, checked."""
    if not (run_dir / "recipe.yaml").is_file():
        raise BitblendError(f"{run_dir}: not a bitblend run directory (no recipe.yaml)")
    if not (run_dir / "model").is_dir():
        raise BitblendError(f"{run_dir}: the run has no final model/ (did it finish?)")
    return recipe_from_dict(read_yaml(run_dir / "recipe.yaml"), str(run_dir / "recipe.yaml"))


def run_kind(run_dir: Path) -> RunKind:
    """Which backend loads `run_dir` (one-line error when it is not a finished run)."""
    if (run_dir / SPEC_FILE).is_file():
        return "ensemble"
    return "tfidf-logreg" if is_classic(run_recipe(run_dir)) else "transformer"


def load_run(run_dir: Path, serving: str = "run") -> Run:
    """Reload a run directory (recipe.yaml + model/) or a saved ensemble spec; `serving` is
    the serving precision of a transformer run (runs/serving.py: run, fp32, bf16, int8)."""
    check_serving(serving)
    if (run_dir / SPEC_FILE).is_file():
        return load_ensemble(run_dir, load_run)
    recipe = run_recipe(run_dir)
    if is_classic(recipe):
        return load_tfidf(run_dir, recipe)
    return load_transformer(run_dir, recipe, serving)


def load_transformer_run(
    run_dir: Path, serving: str = "run", needed_by: str = ""
) -> TransformerRun:
    """A transformer run, or a one-line error naming what `needed_by` cannot use."""
    kind = run_kind(run_dir)
    if kind != "transformer":
        raise BitblendError(
            f"{run_dir}: {needed_by} needs transformer runs; this is {KIND_NAMES[kind]}"
        )
    return load_transformer(run_dir, run_recipe(run_dir), serving)
