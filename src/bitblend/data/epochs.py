"""`train.epochs`: training length in passes over the data, resolved to `train.steps`.

Definition (docs/recipes.md): with N training examples over all tasks and b the examples
an optimizer step takes on average - sum_i share_i x batch_i x grad_accum for homogeneous
batches (share_i: the mixing strategy's target share of task i), batch_size x grad_accum
for mixed batches - a run of E epochs is ceil(E x N / b) steps. One task: exactly E epochs.
Proportional mixing with one batch size: every task about E epochs. Other strategies give
tasks different epochs; the end of a run prints each task's.
"""

from __future__ import annotations

import math
from dataclasses import replace

from bitblend.config.schema import Recipe
from bitblend.data.mixture import base_shares


def steps_for_epochs(recipe: Recipe, sizes: list[int]) -> int:
    """Optimizer steps of `recipe.train.epochs` passes over tasks of `sizes` examples."""
    cfg = recipe.train
    assert cfg.epochs is not None
    if recipe.mixing.batches == "mixed":
        per_step = float(cfg.batch_size * cfg.grad_accum)
    else:
        shares = base_shares(recipe.mixing, [t.name for t in recipe.tasks], sizes)
        batches = [t.batch_size or cfg.batch_size for t in recipe.tasks]
        per_step = sum(s * b for s, b in zip(shares, batches, strict=True)) * cfg.grad_accum
    return max(1, math.ceil(cfg.epochs * sum(sizes) / per_step))


def resolve_epochs(recipe: Recipe, sizes: list[int]) -> Recipe:
    """`recipe` with train.steps from train.epochs (and epochs cleared: recipe.yaml then
    records the steps, which a resume reuses); unchanged when it gives steps."""
    if recipe.train.epochs is None:
        return recipe
    train = replace(recipe.train, steps=steps_for_epochs(recipe, sizes), epochs=None)
    return replace(recipe, train=train)
