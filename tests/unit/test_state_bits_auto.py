"""`precision.state_bits: auto`: 8-bit states where bitsandbytes' update is a native kernel
(CUDA), 32-bit elsewhere; train, the estimate and recipe.yaml agree on what it resolved to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from bitblend.config.load import load_recipe
from bitblend.errors import BitblendError
from bitblend.estimate import estimate_recipe
from bitblend.estimate.probe import save_peaks
from bitblend.precision.state_bits import resolve_state_bits
from bitblend.train.trainer import Trainer
from tests.conftest import make_recipe
from tests.unit.test_estimate import FAKE

CPU = torch.device("cpu")


def test_auto_is_8_on_cuda_and_32_elsewhere() -> None:
    assert resolve_state_bits("auto", "cuda") == 8
    assert resolve_state_bits("auto", "cpu") == 32
    assert resolve_state_bits("auto", "mps") == 32
    assert resolve_state_bits(8, "cpu") == 8  # an explicit width is kept everywhere
    assert resolve_state_bits(4, "cuda") == 4


def test_a_width_that_does_not_exist_is_one_line() -> None:
    with pytest.raises(BitblendError, match="state_bits"):
        make_recipe("precision.state_bits=7")


def test_pretrain_mix_ships_with_auto() -> None:
    assert load_recipe("pretrain-mix", []).precision.state_bits == "auto"


def test_train_and_estimate_resolve_auto_alike_on_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU auto trains torch's AdamW with fp32 states, and recipe.yaml and summary.json
    record 32, so a resume (or a move to CUDA) keeps the width the states were saved in;
    the estimate prices the same width."""
    recipe = make_recipe("precision.state_bits=auto", "train.steps=2", "train.eval_every=0")
    run = tmp_path / "run"
    trainer = Trainer(recipe, run, show_progress=False)
    assert trainer.recipe.precision.state_bits == 32
    assert type(trainer.optimizer).__module__.startswith("torch.optim")
    trainer.fit()
    assert yaml.safe_load((run / "recipe.yaml").read_text())["precision"]["state_bits"] == 32
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"]["state_bits"] == 32
    monkeypatch.setenv("BITBLEND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BITBLEND_ESTIMATE_RUNTIME", "self")
    save_peaks(CPU, FAKE)
    est = estimate_recipe(recipe, precision="recipe", device=CPU, peaks=FAKE)
    assert est.rows[0].spec.state_bits == 32
    eight = estimate_recipe(
        make_recipe("precision.state_bits=8"), precision="recipe", device=CPU, peaks=FAKE
    )
    assert eight.rows[0].spec.state_bits == 8
    assert eight.rows[0].memory.static.states < est.rows[0].memory.static.states
