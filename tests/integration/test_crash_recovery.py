"""Recovery through the real CLI: kill -9 trials, SIGTERM, two writers, disk full, resume of
a finished run, a run killed before its first checkpoint."""

from __future__ import annotations

import importlib.util
import json
import signal
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from bitblend.cli import main
from bitblend.train import checkpoint as ckpt
from tests.small_disk import SmallDisk, small_disk_fixture  # noqa: F401 (a fixture)

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "crash_trials.py"


def _load_trials() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crash_trials", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["crash_trials"] = module  # dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


trials = _load_trials()


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(recipe file, an uninterrupted run of it) for the crash trials' fp32 recipe."""
    work = tmp_path_factory.mktemp("crash")
    recipe = work / "fp32.yaml"
    recipe.write_text(yaml.safe_dump(trials.recipe("fp32")))
    out = work / "straight"
    proc = trials.train([str(recipe), "--out", str(out)])
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    return recipe, out


def one_line_error(code: int, err: str, *parts: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("bitblend: error: ")
    for p in parts:
        assert p in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize(
    "point",
    [
        "save:before-rename:2",  # a checkpoint written, killed before it got its name
        "prune:aside:1",  # killed half way through pruning step-3
        "run:after-final-checkpoint:1",  # killed after the last checkpoint
    ],
)
def test_kill_9_then_resume_is_bit_identical(
    straight: tuple[Path, Path], tmp_path: Path, point: str
) -> None:
    recipe, ref = straight
    trial = trials.run_trial("fp32", recipe, tmp_path / "run", ("point", point), ref)
    assert trial.killed, trial
    assert trial.identical, trial.differences


@pytest.mark.slow
def test_disk_full_stops_in_one_line_and_resumes_after_freeing_space(
    straight: tuple[Path, Path], small_disk: SmallDisk
) -> None:
    """20 MB: step-3 (12 MB) fits, step-6 does not even after pruning first -> exit 2."""
    recipe, ref = straight
    small_disk.resize("20m")
    out = small_disk.path / "run"
    proc = trials.train([str(recipe), "--out", str(out)])
    _, err = proc.communicate()
    line = one_line_error(proc.returncode, err, "could not write checkpoint step-6",
                          "no space left on device (needs about 12.1 MB")  # fmt: skip
    assert str(out / "checkpoints") in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-3"]
    assert ckpt.verify_checkpoint(out / "checkpoints" / "step-3") == 3
    small_disk.resize("200m")  # space freed
    again = trials.train(["--resume", str(out)])
    _, err = again.communicate()
    assert again.returncode == 0, err
    assert trials.compare(ref, out) == []


def test_read_only_out_is_one_line(small_disk: SmallDisk, capsys: Any) -> None:
    small_disk.read_only()
    code = main(["train", "tiny", "--out", str(small_disk.path / "run"), "--quiet"])
    one_line_error(code, capsys.readouterr().err, "read-only file system")


@pytest.mark.slow
@pytest.mark.multiproc
def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = trials.train(["tiny", "--out", str(out), "--set", "train.steps=500",
                         "--set", "train.threads=1"])  # fmt: skip
    while proc.poll() is None and trials._rows(out / "metrics.jsonl") < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step = rows[-1]["step"]
    assert step >= 3 and "Traceback" not in err
    assert last == (
        f"bitblend: stopped by SIGTERM at step {step} (checkpoint step-{step} saved); "
        f"resume with: bitblend train --resume {out}"
    )
    assert ckpt.verify_checkpoint(out / "checkpoints" / f"step-{step}") == step
    assert not [p for p in [*out.iterdir(), *(out / "checkpoints").iterdir()]
                if p.name.startswith(".")]  # fmt: skip


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_second_train_on_the_same_out_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = trials.train(["tiny", "--out", str(out), "--set", "train.steps=5000"])
    try:
        while first.poll() is None and not (out / "recipe.yaml").exists():
            time.sleep(0.05)
        second = trials.train(["tiny", "--out", str(out)])
        _, err2 = second.communicate()
        assert first.poll() is None  # still running: the refusal was the lock's
        one_line_error(second.returncode, err2,
                       f"--out {out}: another bitblend train (pid {first.pid})")  # fmt: skip
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM


@pytest.mark.slow
def test_resuming_a_finished_run_changes_nothing(tmp_path: Path, capsys: Any) -> None:
    """No duplicate rows (the final eval was logged twice before), a torn line dropped."""
    out = tmp_path / "run"
    assert main(["train", "tiny", "--out", str(out), "--quiet", "--set", "train.steps=4"]) == 0
    metrics, evals = (out / "metrics.jsonl").read_text(), (out / "eval.json").read_text()
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 5, "split": "tr')  # a crash in the middle of a write
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert "dropped line 6, cut short by a crash" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == metrics
    assert (out / "eval.json").read_text() == evals
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert (out / "metrics.jsonl").read_text() == metrics


@pytest.mark.slow
@pytest.mark.multiproc
def test_killed_before_its_first_checkpoint_resumes_from_step_0(
    straight: tuple[Path, Path], tmp_path: Path, capsys: Any
) -> None:
    recipe, ref = straight
    out = tmp_path / "run"
    env = trials._env({"BITBLEND_CRASH_AT": "save:model-written:1"})
    proc = trials.train([str(recipe), "--out", str(out)], env)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".tmp-step-3-") for p in (out / "checkpoints").iterdir())
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "removed .tmp-step-3-" in err and "no checkpoint yet; starting again from step 0" in err
    assert trials.compare(ref, out) == []
