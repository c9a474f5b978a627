"""A short run is priced at the steps and batches it really draws (#22 item 3, time): the
trainer's mixture replayed for each task's step count, its samplers for their lengths."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bitblend.config.load import apply_overrides, recipe_from_dict
from bitblend.config.schema import Recipe
from bitblend.estimate import estimate_recipe
from bitblend.estimate.draws import REPLAYED_STEPS, steps_per_task
from bitblend.estimate.lengths import padded, priced_step_time
from bitblend.estimate.probe import save_peaks
from bitblend.estimate.runtime import encoded_lengths
from bitblend.taskspec import load_data
from bitblend.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict
from tests.unit.test_estimate import FAKE  # the same known peaks

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITBLEND_CACHE_DIR", str(tmp_path / "cache"))
    save_peaks(CPU, FAKE)


def _texts(tmp_path: Path, name: str, words: int, rows: int, seed: int) -> str:
    """Rows of 1..`words` words: lengths that spread over several padded lengths."""
    path = tmp_path / f"{name}.csv"
    rng = np.random.default_rng(seed)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(rows):
            n = int(rng.geometric(4 / words))
            w.writerow(
                [" ".join(["news", "sport", "market"][(i + j) % 3] for j in range(n)), i % 2]
            )
    return str(path)


def _two_tasks(tmp_path: Path, *sets: str) -> Recipe:
    """Two tasks of short texts (40 and 12 words at most) under a temperature mixture."""
    data = tiny_recipe_dict()
    data["tasks"] = [
        {"name": "a", "data": _texts(tmp_path, "a", 40, 300, 0)},
        {"name": "b", "data": _texts(tmp_path, "b", 12, 120, 1)},
    ]
    sets = ("model.max_length=64", "mixing.strategy=temperature", *sets)
    return recipe_from_dict(apply_overrides(data, list(sets)))


def _run_draws(recipe: object, tmp_path: Path, steps: int) -> tuple[list[int], list[Counter]]:
    """What a real Trainer deals: its mixture's task per step and, per task, the padded
    length of every batch its sampler hands out in those steps."""
    trainer = Trainer(recipe, tmp_path / "run", show_progress=False)  # type: ignore[arg-type]
    counts = [0] * len(trainer.tasks)
    seen: list[Counter] = [Counter() for _ in trainer.tasks]
    multiple = trainer.recipe.train.pad_to_multiple_of
    for step in range(steps):
        i = trainer.mixture.task_at(step)
        task = trainer.tasks[i]
        idx = task.sampler.next()
        counts[i] += 1
        seen[i][padded(int(task.train.lengths[idx].max()), multiple)] += 1
    return counts, seen


def test_a_short_run_is_priced_at_the_batches_it_draws(tmp_path: Path) -> None:
    """Seven steps over two tasks: the estimate's step counts are the trainer mixture's,
    each task's priced lengths are those of the very batches its sampler deals, and the
    mean step weights each task's time by its steps (not by its target share)."""
    steps = 7
    recipe = _two_tasks(tmp_path, f"train.steps={steps}")
    counts, seen = _run_draws(recipe, tmp_path, steps)
    est = estimate_recipe(recipe, precision="recipe", device=CPU, peaks=FAKE)
    assert all(counts) and [p.run_batches for p in est.priced] == counts
    for p, real, n in zip(est.priced, seen, counts, strict=True):
        assert p.train == pytest.approx({L: k / n for L, k in real.items()})
    # the lengths vary, so the first batches are not the long run's distribution
    assert len(seen[0]) > 1
    row = est.rows[0]
    times = [
        priced_step_time(est.shape, t, p, row.spec, FAKE.at_speed(), states=est.states).total
        for t, p in zip(est.tasks, est.priced, strict=True)
    ]
    drawn = [c / steps for c in counts]
    assert drawn != pytest.approx(est.shares, abs=0.01)  # the replay is not the shares
    assert row.mean_time == pytest.approx(sum(d * t for d, t in zip(drawn, times, strict=True)))


def test_a_long_run_is_priced_at_the_shares_and_the_samplers_distribution(
    tmp_path: Path,
) -> None:
    """Past REPLAYED_STEPS (and with mixed batches) the run is priced as before: target
    shares and the sampler's long-run distribution of lengths."""
    long = _two_tasks(tmp_path, f"train.steps={REPLAYED_STEPS + 1}")
    est = estimate_recipe(long, precision="recipe", device=CPU, peaks=FAKE)
    assert [p.run_batches for p in est.priced] == [0, 0]
    mixed = _two_tasks(tmp_path, "train.steps=7", "mixing.batches=mixed")
    assert steps_per_task(mixed, [300, 120], 7) is None
    est = estimate_recipe(mixed, precision="recipe", device=CPU, peaks=FAKE)
    assert [p.run_batches for p in est.priced] == [0, 0]


def test_sequential_mixture_replays_its_blocks(tmp_path: Path) -> None:
    """A sequential mixture's 10 steps: task 0's block, then task 1's, as train deals them."""
    recipe = _two_tasks(tmp_path, "train.steps=10", "mixing.strategy=sequential")
    counts = steps_per_task(recipe, [300, 120], 10)
    assert counts == [7, 3]  # proportional blocks: round(10 * 300 / 420) = 7
    assert counts == _run_draws(recipe, tmp_path, 10)[0]


def test_the_order_survives_the_runtime_childs_json(tmp_path: Path) -> None:
    """The runtime child sends each training split's lengths in order; they are the
    lengths train's sampler deals from."""
    recipe = _two_tasks(tmp_path)
    lengths = encoded_lengths(recipe, load_data(recipe))
    trainer = Trainer(recipe, tmp_path / "run", show_progress=False)
    for known, task in zip(lengths, trainer.tasks, strict=True):
        assert known is not None
        assert list(known.order) == task.train.lengths.tolist()
        assert type(known).from_json(known.to_json()) == known
