"""Numeric faults end a command with a clear error instead of a silent NaN result:
a run whose every step is non-finite stops (every recipe); predict writes UTF-8 and no NaN."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bitblend.cli import main
from bitblend.precision.health import NonFiniteStuck
from bitblend.train.trainer import Trainer
from tests.conftest import make_recipe


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_run_whose_steps_are_all_nonfinite_stops(precision: str, tmp_path: Path) -> None:
    # Before: every step was skipped, the run went on to the end, exited 0 and saved a NaN
    # model. Only 16-mixed stopped (through its loss scale).
    recipe = make_recipe(
        f"precision.recipe={precision}", "precision.stuck_steps=4", "train.steps=40",
        "train.batch_size=4", "tasks.0.max_examples=64", "train.eval_max_examples=8",
    )  # fmt: skip
    trainer = Trainer(recipe, tmp_path / "run", show_progress=False)
    with torch.no_grad():  # what a diverged update leaves behind
        trainer.model.backbone.encoder.layer[1].intermediate.dense.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteStuck) as info:
        trainer.fit()
    msg = str(info.value)
    assert msg.startswith(f"{precision}: 4 steps in a row had non-finite gradients (steps 1-4)")
    assert "first in heads.bbc" in msg  # backward reaches the head first: NaN logits
    assert trainer.step == 4 and trainer.skipped == 4
    assert not (tmp_path / "run" / "model").exists()  # no NaN model saved
    assert not (tmp_path / "run" / "eval.json").exists()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_predict_writes_utf8_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rows = "".join(f"评论{i},{'正面' if i % 2 else '负面'}\n" for i in range(24))
    (tmp_path / "d.csv").write_text("text,label\n" + rows, encoding="utf-8")
    argv = ["train", "tiny", "--set", "tasks.0.data=d.csv", "--set", "train.steps=1",
            "--set", "train.batch_size=4", "--quiet", "--out", "run"]  # fmt: skip
    assert main(argv) == 0
    (tmp_path / "in.jsonl").write_text('{"text": "很好"}\n', encoding="utf-8")
    capsys.readouterr()
    assert main(["predict", "run", "--input", "in.jsonl", "--output", "p.jsonl"]) == 0
    text = (tmp_path / "p.jsonl").read_text(encoding="utf-8")
    assert "正面" in text and "\\u" not in text  # was "\u6b63\u9762"
    assert set(json.loads(text)["probs"]) == {"正面", "负面"}
    assert main(["predict", "run", "--input", "in.jsonl"]) == 0
    assert "负面" in capsys.readouterr().out
