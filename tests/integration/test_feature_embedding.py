"""tasks[i].feature_embedding periodic / piecewise train under 32-true, bf16-mixed and
bf16-true, resume bit for bit, keep their adapters in fp32, and reload from model/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bitblend.config.load import read_yaml, recipe_from_dict
from bitblend.models.trunk import load_model
from bitblend.train.trainer import Trainer
from tests.integration.test_trainer import _losses, _weights


def _recipe(precision: str) -> dict:
    return {
        "name": "fe",
        "model": {"backbone": "tiny-bert", "max_length": 16},
        "tasks": [
            {"name": "periodic", "data": "breast_cancer", "head": "binary",
             "feature_embedding": "periodic"},
            {"name": "piecewise", "data": "breast_cancer", "head": "binary",
             "feature_embedding": "piecewise"},
        ],
        "precision": {"recipe": precision},
        "train": {"steps": 4, "batch_size": 8, "eval_max_examples": 16, "checkpoint_every": 2,
                  "keep_checkpoints": 0, "baselines": "off"},
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_feature_embeddings_train_and_resume_bitwise(tmp_path: Path, precision: str) -> None:
    recipe = recipe_from_dict(_recipe(precision))
    straight = tmp_path / "straight"
    Trainer(recipe, straight, show_progress=False).fit()
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    for name in ("model", "checkpoints/step-4"):
        shutil.rmtree(cut / name)
    Trainer(recipe_from_dict(read_yaml(cut / "recipe.yaml")), cut, resume=True,
            show_progress=False).fit()  # fmt: skip
    a, b = _losses(straight), _losses(cut)
    assert [a[s] for s in (3, 4)] == [b[s] for s in (3, 4)]
    wa, wb = _weights(straight, 4), _weights(cut, 4)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    # Both adapters exist, trained and stayed fp32 (bf16-true casts the rest of the model).
    assert "adapters.periodic.tabular.frequencies" in wa
    assert "adapters.piecewise.tabular.linear.weight" in wa
    tab = [n for n in wa if ".tabular." in n]
    assert all(wa[n].dtype == torch.float32 for n in tab)
    model, _, _ = load_model(straight / "model")  # the saved model reloads them
    spec = model.specs["piecewise"]
    assert spec.feature_embedding == "piecewise" and len(spec.tabular_bins) == 30
    # The bin edges are the training split's fp32 quantiles, not rounded through bf16.
    loaded = model.adapters["piecewise"]["tabular"].lower
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, torch.tensor(spec.tabular_bins)[:, :-1])
    assert torch.equal(
        model.adapters["periodic"]["tabular"].frequencies,
        wa["adapters.periodic.tabular.frequencies"],
    )
