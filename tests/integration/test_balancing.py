"""Loss balancing under low precision, multi-task resume, and mixing diagnostics."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitblend.config.load import apply_overrides, read_yaml, recipe_from_dict
from bitblend.train.trainer import Trainer

# Every test here trains through the Trainer (seconds each on 2 CPU cores).
pytestmark = pytest.mark.slow


def _two_tasks(**extra: object) -> dict:
    return {
        "name": "bal",
        "model": {"backbone": "tiny-bert", "max_length": 32},
        "tasks": [
            {"name": "bbc", "data": "bbc_news", "max_examples": 160},
            {"name": "digits", "data": "digits", "patch_size": 2, "max_examples": 160},
        ],
        "precision": {"recipe": "bf16-mixed"},
        "optimizer": {"lr": 2e-3},
        "mixing": {"batches": "mixed", "strategy": "uniform", **extra},
        "train": {"steps": 6, "batch_size": 16, "eval_max_examples": 32},
    }


def _fit(data: dict, path: Path, *overrides: str) -> tuple[Trainer, list[dict]]:
    recipe = recipe_from_dict(apply_overrides(data, list(overrides)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 16-mixed on CPU warns by design
        trainer = Trainer(recipe, path, show_progress=False)
    trainer.fit()
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return trainer, [r for r in rows if r["split"] == "train"]


@pytest.mark.parametrize("balancing", ["sum", "uncertainty", "famo", "upgrad", "pcgrad"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_every_balancing_runs_under_low_precision(
    tmp_path: Path, balancing: str, precision: str
) -> None:
    _, rows = _fit(_two_tasks(balancing=balancing), tmp_path / "r", f"precision.recipe={precision}")
    assert all(r["task"] == "bbc+digits" for r in rows)  # both tasks in every batch
    assert all(torch.isfinite(torch.tensor(list(r["task_loss"].values()))).all() for r in rows)
    assert sum(not r["skipped"] for r in rows) >= 4
    weights = rows[-1]["task_weight"]
    if balancing == "uncertainty":
        assert weights != {"bbc": 1.0, "digits": 1.0}  # learned log-variances moved
    if balancing == "famo":
        assert weights["bbc"] != pytest.approx(0.5, abs=1e-6)
    if precision == "16-mixed":
        assert rows[-1]["loss_scale"] is not None


def test_multitask_mixed_dynamic_resume_is_bitwise(tmp_path: Path) -> None:
    """Mixed batches, dynamic reweighting and FAMO state all survive a resume exactly."""
    data = _two_tasks(strategy="dynamic", dynamic_every=2, balancing="famo")
    data["train"].update(steps=8, checkpoint_every=4, keep_checkpoints=0)
    straight = tmp_path / "straight"
    _, rows = _fit(data, straight)
    assert any("heldout_loss" in r for r in rows)
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    shutil.rmtree(cut / "model")
    shutil.rmtree(cut / "checkpoints" / "step-8")
    Trainer(recipe_from_dict(read_yaml(cut / "recipe.yaml")), cut, resume=True,
            show_progress=False).fit()  # fmt: skip
    a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    pick = lambda rows: [(r["step"], r["task_loss"], r["mix_target"]) for r in rows  # noqa: E731
                         if r["split"] == "train"]  # fmt: skip
    assert pick(a) == pick(b)
    wa = load_file(str(straight / "checkpoints/step-8/model.safetensors"))
    wb = load_file(str(cut / "checkpoints/step-8/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_dynamic_mixture_moves_toward_the_lagging_task(tmp_path: Path) -> None:
    """Homogeneous dynamic mixing: digits (random-init adapter, high loss) gains share."""
    data = _two_tasks(strategy="dynamic", dynamic_every=3, dynamic_eta=2.0)
    data["mixing"]["batches"] = "homogeneous"
    data["train"]["steps"] = 12
    _, rows = _fit(data, tmp_path / "r", "precision.recipe=32-true")
    first, last = rows[0]["mix_target"], rows[-1]["mix_target"]
    held = next(r["heldout_loss"] for r in rows if "heldout_loss" in r)
    lagging = max(held, key=held.get)
    assert last[lagging] > first[lagging]


def test_gradient_cosines_are_logged_every_n_steps(tmp_path: Path) -> None:
    """grad_cosine_every=3 over 6 steps: a record at steps 3 and 6, one value per task pair
    (its values are checked against first principles in test_grad_cosine.py)."""
    _, rows = _fit(_two_tasks(grad_cosine_every=3), tmp_path / "r")
    logged = {r["step"]: r["grad_cosine"] for r in rows if "grad_cosine" in r}
    assert sorted(logged) == [3, 6] and all(set(c) == {"bbc|digits"} for c in logged.values())
