"""The estimate header says what runs and counts what is what (#22 item 4)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from bitblend.config.load import load_recipe, read_yaml
from bitblend.data.epochs import steps_for_epochs
from bitblend.estimate import probe, recipe_shapes
from bitblend.estimate.probe import Peaks, save_peaks
from tests.unit.test_cli_errors import run_cli

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITBLEND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BITBLEND_ESTIMATE_RUNTIME", "self")  # no runtime child per CLI call
    rates = {"float32": 1e11, "bfloat16": 2.5e11, "float16": 3e8}
    save_peaks(CPU, Peaks(device="fake", threads=2, matmul_flops=rates, bandwidth=2e10,
                          rng=5e8, op_overhead=2e-5))  # fmt: skip


def _estimate(capsys: pytest.CaptureFixture[str], *sets: str) -> tuple[str, dict]:
    argv = ["estimate", "tiny", "--precision", "recipe", "--set", "train.device=cpu"]
    for s in sets:
        argv += ["--set", s]
    code, text, err = run_cli(argv, capsys)
    assert code == 0, err
    code, out, err = run_cli([*argv, "--json"], capsys)
    assert code == 0, err
    return " ".join(text.split()), json.loads(out)  # unwrapped: rich folds at 80 columns


def test_cpu_header_names_bitblends_attention_not_flash(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text, data = _estimate(capsys)
    assert "bitblend's CPU attention" in text and "flash" not in text
    assert data["model"]["attention"] == "bitblend"
    text, data = _estimate(capsys, "model.kernels=torch")
    assert data["model"]["attention"] in ("math", "flash")
    assert "bitblend's CPU attention" not in text


def test_own_vocabulary_embeddings_are_not_heads(capsys: pytest.CaptureFixture[str]) -> None:
    _, base = _estimate(capsys)
    text, own = _estimate(capsys, "tasks.0.tokenizer=wordpiece", "tasks.0.wordpiece_vocab=500")
    m = own["model"]
    # The heads did not grow by the table: only the 3-row modality-type embedding joins.
    assert m["head_parameters"] - base["model"]["head_parameters"] == 3 * m["hidden"]
    assert m["own_embedding_parameters"] > 0 and base["model"]["own_embedding_parameters"] == 0
    assert m["parameters"] == (
        m["trunk_parameters"] + m["head_parameters"] + m["own_embedding_parameters"]
    )
    assert f"own-vocabulary embeddings {m['own_embedding_parameters']:,}" in text


def test_whole_run_time_counts_the_evaluations(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 steps with eval_every 5: evaluations at 5, 10, 15 and the end, as train runs them;
    an eval over twice the examples costs about twice as much."""
    # both calls at the cached rates: the speed each would measure now is another test's
    monkeypatch.setattr(probe, "speed_now", lambda device, peaks: peaks)
    text, data = _estimate(capsys, "train.eval_every=5", "train.eval_max_examples=64")
    row = data["rows"][0]
    assert row["run"]["steps"] == 20 and row["run"]["evals"] == 4
    assert row["eval_time_s"] > 0
    assert row["run"]["time_s"] == pytest.approx(  # + the first-touch cost, measured now
        20 * row["mean_time_per_step_s"] + 4 * row["eval_time_s"] + row["run"]["warmup_s"]
    )
    assert "whole run (*32-true): 20 steps" in text and "4 eval(s)" in text
    _, more = _estimate(capsys, "train.eval_every=5", "train.eval_max_examples=128")
    assert more["rows"][0]["eval_time_s"] == pytest.approx(2 * row["eval_time_s"], rel=0.01)


def test_whole_run_by_epochs_counts_the_steps_train_would(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """train.epochs: the estimate's steps are the trainer's rule on the same data sizes."""
    data = read_yaml(Path(__file__).parents[2] / "src/bitblend/recipes/tiny.yaml")
    del data["train"]["steps"]
    data["train"]["epochs"] = 2
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    argv = ["estimate", str(recipe_file), "--json", "--precision", "recipe"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    recipe = load_recipe(str(recipe_file))
    _, tasks, _ = recipe_shapes(recipe)
    want = steps_for_epochs(recipe, [t.train_examples for t in tasks])
    # tiny: 512 training examples, batch 16: two epochs are 64 steps
    assert json.loads(out)["rows"][0]["run"]["steps"] == want == math.ceil(2 * 512 / 16)
