"""oneDNN's per-shape kernel caches in the CPU estimate (#22 item 3, memory;
estimate/kernel_cache.py): bf16 matmuls keep a primitive for every new row count, so a run
whose batches come in many lengths holds more than one padded to a single length."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bitblend.estimate import estimate_recipe
from bitblend.estimate.kernel_cache import (
    expected_rows,
    kernel_cache_bytes,
    primitive_bytes,
    row_cost,
)
from bitblend.estimate.lengths import PricedLengths
from bitblend.estimate.memory import CPU_ALLOCATOR_SLACK
from bitblend.estimate.probe import save_peaks
from bitblend.estimate.shapes import TaskShape
from bitblend.procmem import malloc_live_bytes
from bitblend.train.trainer import Trainer
from tests.conftest import make_recipe
from tests.unit.test_estimate import FAKE
from tests.unit.test_estimate_lengths import _short_texts

CPU = torch.device("cpu")
GLIBC = malloc_live_bytes() is not None


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITBLEND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BITBLEND_ESTIMATE_RUNTIME", "self")
    save_peaks(CPU, FAKE)


def _priced(train: dict[int, float]) -> PricedLengths:
    return PricedLengths(train=train, eval={}, worst=max(train), source="data")


def test_expected_distinct_rows_over_a_runs_steps() -> None:
    """A row count is met unless every micro-batch missed it; tasks whose batches have the
    same rows share their kernels."""
    task = TaskShape("a", "classification", 2, batch=4, seq=16)
    half = _priced({8: 0.5, 16: 0.5})
    assert expected_rows([task], [half], [1]) == pytest.approx(1.0)
    assert expected_rows([task], [half], [2]) == pytest.approx(1.5)
    assert expected_rows([task], [half], [60]) == pytest.approx(2.0)
    # a second task of batch 8 at length 8 has the first one's 4 x 16 rows: shared
    other = TaskShape("b", "classification", 2, batch=8, seq=8)
    both = expected_rows([task, other], [half, _priced({8: 1.0})], [60, 60])
    assert both == pytest.approx(2.0)
    assert expected_rows([task, other], [half, _priced({5: 1.0})], [60, 60]) == pytest.approx(3.0)


@pytest.mark.skipif(not GLIBC, reason="needs glibc's mallinfo2 to read malloc's live bytes")
def test_estimated_kernels_per_new_length_match_a_real_models_growth(tmp_path: Path) -> None:
    """The real thing: tiny-bert built by train, forward and backward under bf16 autocast
    at lengths this process has not run; glibc's live bytes grow per new length by what
    the estimate charges a new training row count (within 35%). Where oneDNN has no bf16
    kernels (a CPU without AVX-512 BF16 or AMX: an AVX2 EPYC measured 384 bytes a shape)
    the estimate charges about nothing, and the real model must keep about nothing too."""
    recipe = make_recipe("precision.recipe=bf16-mixed")
    est = estimate_recipe(recipe, precision="recipe", device=CPU, peaks=FAKE)
    row = est.rows[0]
    cost = row_cost(est.shape, est.tasks, row.spec, "cpu")
    trainer = Trainer(recipe, tmp_path / "run", show_progress=False)
    backbone = trainer.model.backbone
    grown = []
    for length in (13, 17, 19, 23, 29):  # lengths no test here pads to (multiples of 8)
        ids = torch.randint(5, 100, (3, length))
        before = malloc_live_bytes() or 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = backbone(input_ids=ids, attention_mask=torch.ones_like(ids))
        out.last_hidden_state.float().sum().backward()
        del out
        backbone.zero_grad(set_to_none=True)
        grown.append((malloc_live_bytes() or 0) - before)
    per_length = sorted(grown)[len(grown) // 2]
    if cost.train < 0.5 * 2**20:  # with kernels: a few primitives of ~0.5 MiB each
        assert per_length < 0.5 * 2**20, (per_length, cost)
    else:
        assert 0.65 * cost.train < per_length < 1.35 * cost.train, (per_length, cost)


def test_many_lengths_cost_more_than_one_and_only_bf16_on_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Texts of 1-6 words padded to their own length meet more row counts than texts that
    fill max_length; fp32 (MKL) keeps nothing per shape, nor does a GPU's path; the term
    stops at the caches' capacity."""
    if primitive_bytes().linear_train <= 0:
        pytest.skip("no oneDNN kernel growth measurable here (no glibc, or no bf16 kernels)")
    short = str(_short_texts(tmp_path, 6))
    many = make_recipe(
        f"tasks.0.data={short}", "model.max_length=64", "precision.recipe=bf16-mixed",
        "train.pad_to_multiple_of=1", "train.steps=40",
    )  # fmt: skip
    one = make_recipe("model.max_length=16", "precision.recipe=bf16-mixed", "train.steps=40")
    est_many = estimate_recipe(many, precision="recipe", device=CPU, peaks=FAKE)
    est_one = estimate_recipe(one, precision="recipe", device=CPU, peaks=FAKE)
    kc_many = est_many.rows[0].high_water.kernel_cache
    kc_one = est_one.rows[0].high_water.kernel_cache
    cost = row_cost(est_one.shape, est_one.tasks, est_one.rows[0].spec, "cpu")
    assert est_one.priced[0].train == {16: 1.0}  # every batch fills max_length 16
    rows_eval = len({b * n for b, n in est_one.priced[0].eval})
    assert kc_one == round(cost.train + rows_eval * cost.evaluation)
    assert kc_many > 2 * kc_one
    # and it is in the process peak
    hw = est_many.rows[0].high_water
    assert est_many.total_bytes(est_many.rows[0]) - replace(hw, kernel_cache=0).process(
        est_many.rows[0].memory.peak, est_many.runtime_bytes, CPU_ALLOCATOR_SLACK, True
    ) == pytest.approx(kc_many, abs=1)
    fp32 = estimate_recipe(one, precision="32-true", device=CPU, peaks=FAKE)
    assert fp32.rows[0].high_water.kernel_cache == 0
    args = (est_many.shape, est_many.tasks, est_many.priced, [40.0], 1, est_many.rows[0].spec)
    assert kernel_cache_bytes(*args, "cuda") == 0
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
    assert 0 < kernel_cache_bytes(*args, "cpu") < kc_many / 2
