"""How many of a run's steps each task trains: the trainer's own mixture, replayed.

The run time prices a step at each task's mean step time, weighted by how often the task
is drawn. Over a long run that is its target share. A short run draws few steps, and the
mixture's interleaved order keeps every task within one step of its target on every
prefix: the users' 16-step, four-task run trains tweets, Reuters, reviews and BBC 6, 5,
4 and 1 times where the shares say 5.2, 5.1, 4.3 and 1.4 - and a BBC step at 128
positions costs three tweet steps. Task choice is a pure function of the recipe
(train/trainer.py builds `Mixture` from the names, sizes, seed and horizon), so the
estimate replays it: exactly the run's counts, not their expectation.
"""

from __future__ import annotations

from bitblend.config.schema import Recipe
from bitblend.data.mixture import Mixture

# Steps replayed at most: a run this short is priced at its own draws; a longer one at the
# target shares its draws converge to (a sequential mixture's first 4096 steps would all
# be one task's, so no prefix of the replay stands for the whole run).
REPLAYED_STEPS = 4096


def steps_per_task(recipe: Recipe, sizes: list[int], steps: int) -> list[int] | None:
    """Optimizer steps of each task in a run of `steps` homogeneous steps, as its Mixture
    deals them; None where the run has no step or more than REPLAYED_STEPS, its batches
    are mixed (every step draws from every task), or the mixture reweights itself from
    evaluation losses (`dynamic`: what it deals depends on the run's losses)."""
    mix = recipe.mixing
    if not 0 < steps <= REPLAYED_STEPS or mix.batches == "mixed" or mix.strategy == "dynamic":
        return None
    names = [t.name for t in recipe.tasks]
    mixture = Mixture(mix, names, sizes, recipe.train.seed, steps)
    counts = [0] * len(names)
    for step in range(steps):
        counts[mixture.task_at(step)] += 1
    return counts
