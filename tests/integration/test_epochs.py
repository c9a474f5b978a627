"""`train.epochs` as the alternative to `train.steps` (#22 item 8)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
from rich.console import Console

from bitblend.config.load import read_yaml, recipe_from_dict
from bitblend.data.epochs import steps_for_epochs
from bitblend.errors import BitblendError
from bitblend.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict


def _by_epochs(epochs: float) -> dict:
    data = tiny_recipe_dict()
    del data["train"]["steps"]
    data["train"]["epochs"] = epochs
    return data


def test_steps_and_epochs_are_either_or() -> None:
    data = _by_epochs(1.0)
    data["train"]["steps"] = 10
    with pytest.raises(BitblendError, match=r"train\.epochs: give train\.steps or train\.epochs"):
        recipe_from_dict(data)
    with pytest.raises(BitblendError, match=r"train\.epochs: expected a number > 0"):
        recipe_from_dict(_by_epochs(0.0))
    assert recipe_from_dict(_by_epochs(2.0)).train.epochs == 2.0


def test_steps_from_epochs_one_task_and_a_proportional_mixture() -> None:
    one = recipe_from_dict(_by_epochs(1.5))  # batch 8, grad_accum 1
    assert steps_for_epochs(one, [230]) == math.ceil(1.5 * 230 / 8)
    two = _by_epochs(1.0)
    two["tasks"].append({"name": "b", "data": "bbc_news", "max_examples": 64, "batch_size": 4})
    mix = recipe_from_dict(two)
    # proportional shares 230/290 and 60/290: b = 8 x 230/290 + 4 x 60/290 examples per step
    per_step = 8 * 230 / 290 + 4 * 60 / 290
    assert steps_for_epochs(mix, [230, 60]) == math.ceil(290 / per_step)


def test_a_run_by_epochs_trains_that_many_and_says_so(tmp_path: Path) -> None:
    recipe = recipe_from_dict(_by_epochs(0.25))
    out = io.StringIO()
    trainer = Trainer(recipe, tmp_path / "run", console=Console(file=out, width=200))
    n = len(trainer.tasks[0].train)
    assert trainer.recipe.train.steps == math.ceil(0.25 * n / 8)
    summary = trainer.fit()
    assert summary["steps"] == trainer.recipe.train.steps and summary["epochs_asked"] == 0.25
    seen = summary["mixture"]["epochs"]["bbc"]
    assert seen == pytest.approx(0.25, abs=8 / n)  # within one batch of the asked epochs
    assert f"epochs: bbc {seen:.2f}" in out.getvalue()
    # recipe.yaml holds the steps (epochs cleared): a resume reads it without the either-or.
    saved = read_yaml(tmp_path / "run" / "recipe.yaml")
    assert saved["train"]["steps"] == summary["steps"] and saved["train"]["epochs"] is None
    recipe_from_dict(saved)
