"""tasks[i].shortcut (a linear model on raw pixels / features added to the head's logits)
trains under 32-true, bf16-mixed and bf16-true, resumes bit for bit, and reloads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bitblend.config.load import read_yaml, recipe_from_dict
from bitblend.errors import BitblendError
from bitblend.models.trunk import load_model
from bitblend.taskspec import load_data
from bitblend.train.setup import build_model
from bitblend.train.trainer import Trainer
from tests.integration.test_trainer import _losses, _weights


def _recipe(precision: str, shortcut: bool = True) -> dict:
    return {
        "name": "sc",
        "model": {"backbone": "tiny-bert", "max_length": 16},
        "tasks": [
            {"name": "digits", "data": "digits", "max_examples": 200, "shortcut": shortcut},
            {"name": "cancer", "data": "breast_cancer", "head": "binary", "shortcut": shortcut},
        ],
        "precision": {"recipe": precision},
        "train": {"steps": 4, "batch_size": 8, "eval_max_examples": 16, "checkpoint_every": 2,
                  "keep_checkpoints": 0, "baselines": "off"},
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_shortcut_trains_and_resumes_bitwise(tmp_path: Path, precision: str) -> None:
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
    short = [n for n in wa if n.startswith("shortcuts.")]
    assert sorted(short) == [f"shortcuts.{t}.{p}" for t in ("cancer", "digits")
                             for p in ("bias", "weight")]  # fmt: skip
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    # The shortcut kept fp32 weights; zero-initialised, they moved (trained, then refitted
    # with the head at the end: train.head_refit auto, which keeps the bias on the head).
    assert all(wa[n].dtype == torch.float32 for n in short)
    assert all(wa[f"shortcuts.{t}.weight"].abs().sum() > 0 for t in ("cancer", "digits"))
    assert all(not wa[f"shortcuts.{t}.bias"].any() for t in ("cancer", "digits"))
    model, _, _ = load_model(straight / "model")  # the saved model reloads it
    assert set(model.shortcuts) == {"digits", "cancer"}


@pytest.mark.slow
def test_shortcut_starts_as_the_plain_head() -> None:
    """Zero-initialised: at step 0 a shortcut model's logits equal the one without."""
    on, off = recipe_from_dict(_recipe("32-true")), recipe_from_dict(_recipe("32-true", False))
    datas = load_data(on)
    m_on, m_off = build_model(on, datas)[0].eval(), build_model(off, datas)[0].eval()
    spec = m_on.specs["digits"]
    img = torch.rand(3, spec.num_patches, spec.patch_dim)  # (batch, patches, pixels)
    batch = {"image": img, "image_mask": torch.ones(3, spec.num_patches, dtype=torch.long)}
    assert torch.equal(m_on("digits", **batch), m_off("digits", **batch))


@pytest.mark.slow
def test_shortcut_on_text_is_one_line_error() -> None:
    data = _recipe("32-true")
    data["tasks"] = [{"name": "bbc", "data": "bbc_news", "shortcut": True, "max_examples": 50}]
    recipe = recipe_from_dict(data)
    with pytest.raises(BitblendError, match=r"tasks\[0\]\.shortcut: needs image or tabular"):
        build_model(recipe, load_data(recipe))
