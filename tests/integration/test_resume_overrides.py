"""`--resume RUN --set ...`: what may change, the LR continues, and the run records it all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from bitblend.cli import main
from bitblend.config.load import dump_recipe, read_yaml, recipe_from_dict
from bitblend.config.resume import RESUMABLE, changed_keys, resume_recipe
from bitblend.errors import BitblendError
from bitblend.optim.build import lr_factor
from bitblend.train.recipe_log import read_history
from bitblend.train.trainer import Trainer
from tests.conftest import make_recipe
from tests.unit.test_cli_errors import assert_one_line_error, snapshot

LR = 1e-3
SMALL = ("tasks.0.max_examples=64", "model.max_length=16", "train.batch_size=4")
SCHEDULE = ("schedule.name=linear", "schedule.min_lr_ratio=0.1", f"optimizer.lr={LR}", *SMALL)


def test_changed_keys_names_every_difference_by_path() -> None:
    a = {"train": {"steps": 4, "seed": 0}, "tasks": [{"weight": 1.0}, {"weight": 1.0}]}
    b = {"train": {"steps": 6, "seed": 0}, "tasks": [{"weight": 1.0}, {"weight": 2.0}]}
    assert changed_keys(a, b) == ["tasks.1.weight", "train.steps"]
    assert changed_keys(a, a) == []
    assert changed_keys({"tasks": [1]}, {"tasks": [1, 2]}) == ["tasks"]  # a task added


def _fake_run(tmp_path: Path, *overrides: str) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(dump_recipe(make_recipe(*overrides)))
    return run


def test_resume_recipe_allows_only_keys_outside_the_saved_state(tmp_path: Path) -> None:
    run = _fake_run(tmp_path, "train.steps=4")
    recipe, changed = resume_recipe(run, ["train.steps=9", "train.eval_every=3"])
    assert recipe.train.steps == 9
    assert changed == {"train.eval_every": [0, 3], "train.steps": [4, 9]}
    # Setting a key to the value it already has changes nothing, so it is allowed.
    assert resume_recipe(run, ["optimizer.lr=0.001"])[1] == {}
    with pytest.raises(BitblendError, match=r"cannot change optimizer\.lr, schedule\.name on"):
        resume_recipe(run, ["optimizer.lr=0.1", "schedule.name=cosine", "train.steps=9"])
    assert "train.steps" in RESUMABLE and "train.batch_size" not in RESUMABLE


def test_disallowed_resume_key_is_one_line_exit_2_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _fake_run(tmp_path, "train.steps=4")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(run)
    code = main(["train", "--resume", str(run), "--quiet", "--set", "train.batch_size=4",
                 "--set", "tasks.0.weight=2", "--set", "train.steps=8"])  # fmt: skip
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, "tasks.0.weight", "train.batch_size", "on resume")
    assert "train.steps," not in err.split("changeable")[0]  # steps itself was allowed
    assert snapshot(run) == before


def _lrs(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in rows if r["split"] == "train"}


@pytest.mark.slow
def test_extending_steps_keeps_the_planned_schedule(tmp_path: Path) -> None:
    """A run planned for 4 steps stops at 2; resumed with train.steps=6 its LR continues the
    4-step plan (no jump to a 6-step plan), then holds the floor (min_lr_ratio) after it."""
    run = tmp_path / "run"
    first = make_recipe("train.steps=4", *SCHEDULE)
    trainer = Trainer(first, run, show_progress=False)
    trainer._prepare_dir()
    lrs = [trainer.train_step()["lr"] for _ in range(2)]
    trainer.save_checkpoint()
    assert lrs == pytest.approx([LR * lr_factor(s, 4, first.schedule) for s in (0, 1)])

    more = make_recipe("train.steps=6", *SCHEDULE)
    resumed = Trainer(more, run, resume=True, show_progress=False,
                      overrides=["train.steps=6"], changed={"train.steps": [4, 6]})  # fmt: skip
    assert resumed.restore_latest() == 2
    assert resumed.plan_steps == 4
    after = [resumed.train_step()["lr"] for _ in range(4)]
    planned = [LR * lr_factor(s, 4, first.schedule) for s in (2, 3)]
    assert after == pytest.approx([*planned, 0.1 * LR, 0.1 * LR])
    # What a 6-step plan would have given at step 3: the jump this rule avoids.
    assert LR * lr_factor(2, 6, more.schedule) != pytest.approx(after[0])


@pytest.mark.slow
def test_resume_via_cli_records_the_recipe_and_its_history(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    data = yaml.safe_load(dump_recipe(make_recipe(*SCHEDULE)))
    recipe.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    sets = ["train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=0"]
    argv = ["train", str(recipe), "--out", str(run), "--quiet"]
    assert main(argv + [x for s in sets for x in ("--set", s)]) == 0
    straight = _lrs(run)
    shutil.rmtree(run / "checkpoints" / "step-4")  # as if it had stopped after step 2
    assert main(["train", "--resume", str(run), "--quiet", "--set", "train.steps=5"]) == 0
    lrs = _lrs(run)
    assert [lrs[s] for s in (1, 2, 3, 4)] == pytest.approx([straight[s] for s in (1, 2, 3, 4)])
    assert lrs[5] == pytest.approx(0.1 * LR)
    assert recipe_from_dict(read_yaml(run / "recipe.yaml")).train.steps == 5
    start, resume = read_history(run)
    assert start["event"] == "start" and start["step"] == 0
    assert start["overrides"] == sets
    assert resume["event"] == "resume" and resume["step"] == 2
    assert resume["overrides"] == ["train.steps=5"]
    assert resume["changed"] == {"train.steps": [4, 5]}
    assert resume["plan_steps"] == 4 and resume["train_steps"] == 5
    assert json.loads((run / "summary.json").read_text())["steps"] == 5
