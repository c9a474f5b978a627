"""Figures a run prints must be true: MFU against a probe a run cannot beat, throughput of a
resumed run from the same steps as its time, progress lines in logs (#22 items 1, 2, 5)."""

from __future__ import annotations

import io
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from bitblend.config.load import read_yaml, recipe_from_dict
from bitblend.estimate.probe import Peaks, cache_key, cached_peaks, save_peaks
from bitblend.train.trainer import Trainer
from tests.conftest import make_recipe

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("BITBLEND_CACHE_DIR", str(cache))
    return cache


def _plant(flops: float, **kw: float) -> None:
    """A cached probe of this machine that claims `flops` FLOP/s in every dtype (and 1 GB/s
    unless `bandwidth` is given)."""
    # The cache key names the thread count: the tiny recipe's train.threads=2, so plant it
    # under 2 threads whatever this machine's core count (the trainer sets 2 as well).
    torch.set_num_threads(2)
    rates = {"float32": flops, "bfloat16": flops, "float16": flops}
    save_peaks(CPU, Peaks(device="planted", threads=torch.get_num_threads(),
                          matmul_flops=rates, rng=1e8, op_overhead=1e-5,
                          **{"bandwidth": 1e9, **kw}))  # fmt: skip


def test_run_that_beats_a_low_cached_probe_reprobes_and_mfu_stays_below_one(
    tmp_path: Path, _private_cache: Path
) -> None:
    """A probe taken while the machine was busy (here: 1 kFLOP/s, planted) would give an MFU
    in the millions; the run notices it beat the probe, probes again and keeps the best."""
    _plant(1e3)
    summary = Trainer(make_recipe("train.steps=2"), tmp_path / "run", show_progress=False).fit()
    assert summary["flops_per_s"] > 1e3  # the run really beat the planted peak
    assert summary["mfu"] is not None and 0 < summary["mfu"] <= 1
    assert summary["peak_flops_per_s"] >= summary["flops_per_s"]
    probe = summary["probe"]
    assert probe["source"] == "reprobed" and probe["reason"].startswith("beaten")
    assert {"measured_at", "age_s", "load_avg_at_probe", "load_avg_now"} <= set(probe)
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["probe"]["source"] == "reprobed" and written["mfu"] == summary["mfu"]
    # The better reading is remembered: the next run or estimate starts from it.
    again = cached_peaks(CPU)
    assert again is not None and again.flops("float32") == summary["peak_flops_per_s"]


def test_stale_or_busy_cached_probe_is_measured_again(_private_cache: Path) -> None:
    from bitblend.estimate.probe import get_peaks

    _plant(1e3, measured_at=time.time() - 30 * 24 * 3600)
    peaks = get_peaks(CPU, budget=0.2)
    assert not peaks.cached and peaks.reason == "stale" and peaks.flops("float32") > 1e3
    # Taken under a load far above this machine's now: the reading is not trusted.
    _plant(1e3, load_avg=1e6)
    peaks = get_peaks(CPU, budget=0.2)
    assert peaks.reason == "busy-then" and peaks.flops("float32") > 1e3
    # Measured again after a busy probe: both are lower bounds, the best of each rate stays
    # (a re-probe in a slow phase must not lower the peaks or the typical bandwidth).
    _plant(1e15, load_avg=1e6, bandwidth=1e15)
    peaks = get_peaks(CPU, budget=0.2)
    assert peaks.reason == "busy-then" and peaks.source == "reprobed"
    assert peaks.flops("float32") == 1e15 and peaks.bandwidth == 1e15
    assert peaks.load_avg < 1e6  # the new probe's conditions: not measured again next time
    # A stale probe is replaced, not merged: the hardware may have changed in a week.
    _plant(1e15, measured_at=time.time() - 30 * 24 * 3600)
    assert get_peaks(CPU, budget=0.2).flops("float32") < 1e15
    # A recent probe taken on a quiet machine is used as it is.
    _plant(1e3)
    peaks = get_peaks(CPU, budget=0.2)
    assert peaks.cached and peaks.source == "cached" and peaks.flops("float32") == 1e3
    data = json.loads((_private_cache / "probe.json").read_text())
    assert data[cache_key(CPU)]["measured_at"] > 0


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def test_resumed_throughput_comes_from_the_same_steps_as_its_time(tmp_path: Path) -> None:
    """After a resume the run's tokens/s is the whole run's tokens over the whole run's step
    time, and the segment's is the resumed steps' tokens over their own time."""
    recipe = make_recipe("train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=0")
    run = tmp_path / "run"
    Trainer(recipe, run, show_progress=False).fit()
    shutil.rmtree(run / "model")
    shutil.rmtree(run / "checkpoints" / "step-4")
    (run / "summary.json").unlink()
    resumed = recipe_from_dict(read_yaml(run / "recipe.yaml"))
    summary = Trainer(resumed, run, resume=True, show_progress=False).fit()
    rows = {r["step"]: r for r in _rows(run)}
    seg = summary["segment"]
    assert (seg["start_step"], seg["steps"]) == (2, 2)
    assert seg["tokens"] == sum(rows[s]["tokens"] for s in (3, 4))
    assert seg["train_time_s"] == pytest.approx(sum(rows[s]["step_time_s"] for s in (3, 4)))
    assert seg["tokens_per_s"] == pytest.approx(seg["tokens"] / seg["train_time_s"])
    # The whole run: tokens and time of all four steps, never all tokens over one segment.
    assert summary["tokens"] == sum(r["tokens"] for r in rows.values())
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["train_time_s"])
    assert summary["train_time_s"] > seg["train_time_s"]


def test_progress_lines_when_output_is_not_a_terminal(tmp_path: Path) -> None:
    """Redirected output (`> log`, CI) gets plain lines: step, loss per task, tokens/s, ETA,
    and each evaluation's results when it happens."""
    out = io.StringIO()
    console = Console(file=out, width=200)
    assert not console.is_terminal
    recipe = make_recipe(
        "train.steps=4", "train.progress_every=2", "train.progress_seconds=0", "train.eval_every=2"
    )
    Trainer(recipe, tmp_path / "run", console=console, show_progress=True).fit()
    text = out.getvalue()
    lines = [x for x in text.splitlines() if re.match(r"step \d+/4 ", x)]
    assert [x.split()[1] for x in lines] == ["1/4", "2/4", "4/4"], text
    for line in lines:
        assert re.search(r"loss bbc=\d+\.\d{4} \| \d+ tokens/s \| elapsed \S+ eta \S+", line), line
    evals = [x for x in text.splitlines() if x.startswith("eval step ")]
    assert [x.split(":")[0] for x in evals] == ["eval step 2", "eval step 4"], text
    assert "accuracy=" in evals[0]
    assert re.search(r"epochs: bbc \d+\.\d\d", text)


def test_bitblend_train_piped_to_a_file_prints_progress(tmp_path: Path) -> None:
    """The real command with stdout a pipe (as under nohup, CI or `> log`)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["BITBLEND_CACHE_DIR"] = str(tmp_path / "cache")
    env.pop("FORCE_COLOR", None)
    argv = ["train", "tiny", "--out", str(tmp_path / "run"), "--set", "train.steps=3",
            "--set", "train.progress_every=1", "--set", "train.eval_every=2"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "bitblend.cli", *argv],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    steps = re.findall(r"^step (\d)/3 \(\d+%\) loss bbc_news=", proc.stdout, re.MULTILINE)
    assert steps == ["1", "2", "3"], proc.stdout
    assert re.search(r"^eval step 2: bbc_news accuracy=", proc.stdout, re.MULTILINE)


def test_one_fast_step_above_the_probe_triggers_a_reprobe_too() -> None:
    """The run's average is under the cached peak, but its fastest step is above it: the
    probe is low all the same, and is measured again."""
    from bitblend.estimate import run_performance
    from bitblend.taskspec import load_data
    from bitblend.train.setup import build_model

    recipe = make_recipe()
    model, _, _ = build_model(recipe, load_data(recipe))
    flops_per_token = run_performance(model, 1000, 10, 0, 1.0, CPU, "float32")["train_flops"] / 1000
    _plant(1e3)
    seconds = 1000 * flops_per_token / 5e2  # the average: 500 FLOP/s, half the planted peak
    best_tps = 2e3 / flops_per_token  # the fastest step: 2 kFLOP/s, twice the planted peak
    quiet = run_performance(model, 1000, 10, 0, seconds, CPU, "float32")
    assert quiet["probe"]["source"] == "cached" and quiet["peak_flops_per_s"] == 1e3
    perf = run_performance(model, 1000, 10, 0, seconds, CPU, "float32", best_tps)
    assert perf["best_step_flops_per_s"] == pytest.approx(2e3)
    assert perf["probe"]["source"] == "reprobed" and perf["peak_flops_per_s"] > 2e3
    assert 0 < perf["mfu"] <= 1
