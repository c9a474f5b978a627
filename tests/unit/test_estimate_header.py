"""The estimate header says what runs and counts what is what (#22 item 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bitblend.estimate.probe import Peaks, save_peaks
from tests.unit.test_cli_errors import run_cli

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITBLEND_CACHE_DIR", str(tmp_path / "cache"))
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
