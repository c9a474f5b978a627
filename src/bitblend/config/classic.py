"""`model.backbone: tfidf-logreg`: the name and the recipe rules of the scikit-learn backbone.

Here, in config/, so that loading a recipe can check them without importing the code that
trains (ensemble/classic.py) or loads (runs/tfidf.py) such a run.
"""

from __future__ import annotations

from bitblend.config.schema import Recipe
from bitblend.errors import BitblendError

CLASSIC = "tfidf-logreg"
HEADS = ("classification", "binary")


def is_classic(recipe: Recipe) -> bool:
    """Whether the recipe trains TF-IDF + logistic regression instead of a transformer."""
    return recipe.model.backbone == CLASSIC


def check_classic_recipe(recipe: Recipe) -> None:
    """Heads and modalities a TF-IDF model can train (checked when the recipe loads)."""
    for i, task in enumerate(recipe.tasks):
        if task.head not in HEADS:
            raise BitblendError(
                f"tasks[{i}].head: model.backbone {CLASSIC} trains classification or binary "
                f"heads, got {task.head}"
            )
        if task.modality not in ("auto", "text"):
            raise BitblendError(
                f"tasks[{i}].modality: model.backbone {CLASSIC} needs text, got {task.modality}"
            )
        if task.tokenizer != "backbone":
            raise BitblendError(
                f"tasks[{i}].tokenizer: model.backbone {CLASSIC} has its own vocabulary; "
                "expected backbone"
            )
