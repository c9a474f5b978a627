"""A streamed task through the Trainer: resume mid-shard equals the uninterrupted run bit for
bit (weights, optimizer state, losses), and every step logs its data wait."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from bitblend.config.load import read_yaml, recipe_from_dict
from bitblend.train.trainer import Trainer
from tests.streaming_corpus import write_corpus

pytestmark = pytest.mark.slow


def _recipe(data: Path, workers: int) -> dict[str, Any]:
    return {
        "name": "stream",
        "model": {"backbone": "tiny-gpt", "max_length": 24},
        "tasks": [
            {
                "name": "lm",
                "data": str(data),
                "head": "causal_lm",
                "streaming": True,
                "stream_eval_rows": 8,
                "shuffle_buffer": 16,
            },
        ],
        "precision": {"recipe": "32-true"},
        "optimizer": {"lr": 1e-3},
        "train": {
            "steps": 8,
            "batch_size": 4,
            "grad_accum": 2,
            "checkpoint_every": 4,
            "keep_checkpoints": 0,
            "stream_workers": workers,
            "eval_max_examples": 8,
        },
    }


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_streamed_resume_equals_straight_run_bitwise(tmp_path: Path) -> None:
    """8 steps of 8 rows cross shard boundaries of 37 rows (and the cut at step 4 falls
    mid-shard, mid-window); the run resumed there ends with the same bits."""
    data = tmp_path / "shards"
    write_corpus(data)
    straight = tmp_path / "straight"
    Trainer(recipe_from_dict(_recipe(data, 1)), straight, show_progress=False).fit()
    rows = [r for r in _rows(straight) if r["split"] == "train"]
    assert len(rows) == 8 and all(r["data_wait"] >= 0.0 for r in rows)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["data_errors"] == {}

    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    for name in ("model", "checkpoints/step-8"):
        shutil.rmtree(cut / name)
    for name in ("eval.json", "summary.json"):
        (cut / name).unlink()
    state = (cut / "checkpoints/step-4/state.json").read_text()
    assert '["kind", "stream"]' in state and '["consumed", 32]' in state  # stream position
    assert '"packer"' in state  # causal_lm streams are packed: the partial row is saved
    recipe = recipe_from_dict(read_yaml(cut / "recipe.yaml"))
    Trainer(recipe, cut, resume=True, show_progress=False).fit()

    a = {r["step"]: r["loss"] for r in _rows(straight) if r["split"] == "train"}
    b = {r["step"]: r["loss"] for r in _rows(cut) if r["split"] == "train"}
    assert [a[s] for s in range(5, 9)] == [b[s] for s in range(5, 9)]
    for kind in ("model", "state"):
        wa = load_file(str(straight / f"checkpoints/step-8/{kind}.safetensors"))
        wb = load_file(str(cut / f"checkpoints/step-8/{kind}.safetensors"))
        for name in wa:
            assert torch.equal(wa[name], wb[name]), name
