"""A whole CPU run's peak beyond its longest step (#22 item 3, memory; estimate/wholerun.py):
the heap its shorter steps lay out below the longest one, and the end of the run's pages."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bitblend.estimate import estimate_recipe
from bitblend.estimate.highwater import HighWater
from bitblend.estimate.memory import CPU_ALLOCATOR_SLACK, peak_bytes
from bitblend.estimate.probe import save_peaks
from bitblend.estimate.wholerun import shorter_steps_bytes
from tests.conftest import make_recipe
from tests.unit.test_estimate import FAKE
from tests.unit.test_estimate_lengths import _short_texts

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITBLEND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BITBLEND_ESTIMATE_RUNTIME", "self")
    save_peaks(CPU, FAKE)


def test_short_texts_keep_a_shorter_steps_layout_below_the_longest(tmp_path: Path) -> None:
    """Texts of 1-6 words at max_length 64: memory is still priced at the longest batch,
    and the process adds one step's activations and temporaries at the data's mean length
    - the heap the shorter steps laid out, which the longest step's larger blocks do not
    reuse."""
    data = str(_short_texts(tmp_path, 6))
    recipe = make_recipe(f"tasks.0.data={data}", "model.max_length=64")
    est = estimate_recipe(recipe, precision="recipe", device=CPU, peaks=FAKE)
    (p,) = est.priced
    assert p.measured and p.mean_train < p.worst
    row, task = est.rows[0], est.tasks[0]
    seq = -(-task.seq * p.mean_train // p.worst)  # the mean length, rounded up
    short = peak_bytes(est.shape, replace(task, seq=int(seq)), row.spec, est.states)
    assert row.high_water.shorter == short.activations + short.temporary_total > 0
    # below the longest step's own (here a tiny model, whose peak is its optimizer step)
    assert row.high_water.shorter < row.memory.activations + row.memory.temporary_total
    hw = row.high_water
    live = max(row.memory.peak, hw.eval, hw.checkpoint_live)
    slack = round(live * (1 + CPU_ALLOCATOR_SLACK))
    assert est.total_bytes(row) == est.runtime_bytes + row.high_water.shorter + slack
    # lengths unknown (priced at the worst case): no shorter steps, the step model alone
    worst = estimate_recipe(recipe, precision="recipe", device=CPU, peaks=FAKE, lengths=[None])
    assert worst.rows[0].high_water.shorter == 0
    above = est.total_bytes(row) - est.runtime_bytes  # runtime "self": this process's RSS
    above_worst = worst.total_bytes(worst.rows[0]) - worst.runtime_bytes
    assert above - above_worst == row.high_water.shorter


def test_full_length_steps_and_gpus_add_no_shorter_layout() -> None:
    """Every step at the worst length (the tiny data's texts fill max_length 16), or a
    GPU's caching allocator: nothing below the longest step."""
    recipe = make_recipe("model.max_length=16")
    est = estimate_recipe(recipe, precision="recipe", device=CPU, peaks=FAKE)
    (p,) = est.priced
    assert p.mean_train == p.worst
    assert est.rows[0].high_water.shorter == 0
    row = est.rows[0]
    short = replace(p, train={8: 1.0})
    args = (est.shape, est.tasks, [short], row.spec, est.states)
    assert shorter_steps_bytes(*args, "cpu", True) > 0
    assert shorter_steps_bytes(*args, "cuda", True) == 0


def test_end_of_run_lands_on_top_of_the_peak() -> None:
    """The end of the run's pages add to the CPU peak in both models (step slack and
    layouts), never on a GPU (tensors only)."""
    hw = HighWater(build=0, eval=10, save=0, end=7)
    assert hw.process(100, 50, 0.25, True) == 50 + 125 + 7
    assert hw.process(100, 50, 0.25, False) == 100
    layouts = replace(hw, layouts=2)
    assert (
        layouts.layout_process(100, 40, 50)
        == replace(layouts, end=0).layout_process(100, 40, 50) + 7
    )


def test_the_runtime_child_measures_the_end_of_run() -> None:
    """A fresh process that imports the baselines' and the report's libraries and draws
    one plot maps new pages outside its heap (matplotlib, scikit-learn: tens of MiB)."""
    code = (
        "import json; from bitblend.estimate.wholerun import end_of_run_bytes as e; "
        "print(json.dumps([e(), e()]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    first, again = json.loads(out.stdout.strip().splitlines()[-1])
    assert first > 5 * 2**20  # modules mapped and objects made the first time
    assert again < first / 2  # already there: a second call adds little
