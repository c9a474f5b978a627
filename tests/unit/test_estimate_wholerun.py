"""A whole CPU run's peak beyond its longest step (#22 item 3, memory; estimate/wholerun.py):
the end of the run's pages (the kernel caches: test_estimate_kernel_cache.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bitblend.estimate.highwater import HighWater
from bitblend.estimate.probe import save_peaks
from tests.unit.test_estimate import FAKE

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITBLEND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BITBLEND_ESTIMATE_RUNTIME", "self")
    save_peaks(CPU, FAKE)


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


def test_an_evaluation_after_a_heap_release_counts_its_live_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a tuned heap every evaluation starts by giving the free pages back, so an
    evaluation that decides the peak counts its live bytes without the steps' slack; the
    step keeps its slack, and a run without the release counts both with it."""
    hw = HighWater(build=0, eval=1000, save=0, end=0, kernel_cache=20)
    released = replace(hw, eval_released=True)
    assert hw.process(100, 50, 0.25, True) == 50 + 20 + 1250
    assert released.process(100, 50, 0.25, True) == 50 + 20 + 1000
    assert released.process(900, 50, 0.25, True) == 50 + 20 + 1125  # the step decides
    from bitblend.estimate import heap_released
    from tests.conftest import make_recipe

    assert heap_released(make_recipe())
    assert not heap_released(make_recipe("train.cpu_heap=false"))
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # the user's malloc settings win
    assert not heap_released(make_recipe())
