"""A run writes each task's baseline beside its metric: eval.json, summary.json,
report.html; fitted on the run's own split rows; `train.baselines: off` skips it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bitblend.config.load import recipe_from_dict
from bitblend.taskspec import load_data
from bitblend.train.baselines import rows_digest
from bitblend.train.trainer import Trainer


def _recipe(baselines: str) -> dict:
    return {
        "name": "bl",
        "model": {"backbone": "tiny-bert", "max_length": 16},
        "tasks": [
            {"name": "digits", "data": "digits", "max_examples": 300},
            {"name": "cancer", "data": "breast_cancer", "head": "binary"},
        ],
        "precision": {"recipe": "32-true"},
        "train": {"steps": 2, "batch_size": 8, "eval_max_examples": 50, "seed": 5,
                  "baselines": baselines},
    }  # fmt: skip


@pytest.mark.slow
def test_run_writes_baselines_on_its_own_split(tmp_path: Path) -> None:
    recipe = recipe_from_dict(_recipe("auto"))
    Trainer(recipe, tmp_path / "run", show_progress=False).fit()
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # eval.json: the same results without the fitting times (they vary run to run).
    untimed = {n: {k: v for k, v in r.items() if k != "seconds"}
               for n, r in summary["baselines"]["tasks"].items()}  # fmt: skip
    assert untimed == ev["baselines"]
    assert all("seconds" in r for r in summary["baselines"]["tasks"].values())
    assert 0 < summary["baselines"]["share_of_wall"] < 1
    datas = load_data(recipe)  # the same seed: the run's split, loaded afresh
    for task, data in zip(recipe.tasks, datas, strict=True):
        res = ev["baselines"][task.name]
        assert res["eval_examples"] == ev["tasks"][task.name]["examples"] == 50
        assert res["train_examples"] == len(data.train)
        assert res["train_rows_sha256"] == rows_digest(data.train)
        assert res["eval_rows_sha256"] == rows_digest(data.eval.take(np.arange(50)))
    assert ev["baselines"]["digits"]["model"] == "logreg"
    assert set(ev["baselines"]["cancer"]["candidates"]) == {"logreg", "hgb"}
    html = (tmp_path / "run" / "report.html").read_text()
    assert "baseline (same split)" in html and "(logreg)" in html


@pytest.mark.slow
def test_baselines_off(tmp_path: Path) -> None:
    Trainer(recipe_from_dict(_recipe("off")), tmp_path / "run", show_progress=False).fit()
    assert "baselines" not in json.loads((tmp_path / "run" / "eval.json").read_text())
    assert "baselines" not in json.loads((tmp_path / "run" / "summary.json").read_text())
