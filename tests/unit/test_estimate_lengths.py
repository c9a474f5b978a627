"""The time model prices steps at the lengths the data has (#22 item 3, time): dynamic
padding under train's own batching, evaluation's sorted batches, packed rows at full length."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bitblend.data.sampler import BatchSampler
from bitblend.estimate import estimate_recipe
from bitblend.estimate.first_touch import PAGE, first_touch
from bitblend.estimate.flops import step_time
from bitblend.estimate.lengths import (
    TaskLengths,
    eval_batches,
    grouped_batch_lengths,
    histogram,
    padded,
    random_batch_lengths,
)
from bitblend.estimate.memory import CPU_ALLOCATOR_SLACK, activation_bytes
from bitblend.estimate.probe import save_peaks
from bitblend.estimate.runtime import encoded_lengths
from bitblend.taskspec import load_data
from tests.conftest import make_recipe
from tests.unit.test_cli_errors import run_cli
from tests.unit.test_estimate import FAKE  # the same known peaks

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITBLEND_CACHE_DIR", str(tmp_path / "cache"))
    save_peaks(CPU, FAKE)


def _spread() -> dict[int, int]:
    """A skewed length histogram: many short rows, a tail of long ones."""
    rng = np.random.default_rng(3)
    return histogram(np.minimum(128, rng.geometric(1 / 30, 600) + 2))


def _mean(dist: dict[int, float]) -> float:
    return sum(k * p for k, p in dist.items())


def test_random_batch_max_is_exact_against_brute_force() -> None:
    """E[padded max of a random batch] (exact, without replacement) equals the mean over
    many brute-force draws, and so does the whole distribution; train's own sampler without
    length grouping deals batches with the same distribution."""
    counts = _spread()
    lengths = np.repeat(list(counts), list(counts.values()))
    exact = random_batch_lengths(counts, 16, 8)
    assert sum(exact.values()) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    draws = [
        padded(int(lengths[rng.choice(len(lengths), 16, replace=False)].max()), 8)
        for _ in range(20000)
    ]
    assert _mean(exact) == pytest.approx(float(np.mean(draws)), rel=0.01)
    for k, p in exact.items():
        assert p == pytest.approx(draws.count(k) / len(draws), abs=0.015)
    sampled = grouped_batch_lengths(counts, 16, 16, 8, seed=1, group_by_length=False)
    assert _mean(sampled) == pytest.approx(_mean(exact), rel=0.02)


def test_pad_to_multiple_of_is_respected() -> None:
    counts = {9: 100, 17: 3}
    for multiple in (1, 8, 32):
        for dist in (
            random_batch_lengths(counts, 8, multiple),
            grouped_batch_lengths(counts, 8, 8, multiple),
        ):
            assert all(k % multiple == 0 for k in dist)
    assert set(random_batch_lengths({9: 50}, 4, 8)) == {16}  # 9 tokens pad to 16
    assert set(random_batch_lengths({9: 50}, 4, 1)) == {9}


def test_length_grouping_pads_less_than_random_batches() -> None:
    """train.group_by_length sorts windows of 50 batches: a batch's longest row is close to
    its others, so its padded length is near the mean, far below a random batch's max."""
    counts = _spread()
    mean = sum(k * n for k, n in counts.items()) / sum(counts.values())
    grouped = _mean(grouped_batch_lengths(counts, 16, 16, 8))
    rand = _mean(random_batch_lengths(counts, 16, 8))
    assert mean < grouped < 0.7 * rand
    # micro-batches of a grad_accum step are consecutive pieces of the sorted batch
    micro = _mean(grouped_batch_lengths(counts, 4, 16, 8))
    assert mean < micro < grouped


def test_grouped_lengths_follow_trains_sampler() -> None:
    """The simulated distribution is what BatchSampler deals in its first epoch."""
    counts = {8: 300, 40: 100, 120: 50}
    lengths = np.repeat(list(counts), list(counts.values()))
    sampler = BatchSampler(lengths, 16, 7, 2, True)
    real = [padded(int(lengths[b].max()), 8) for e in range(40) for b in sampler.epoch_batches(e)]
    dist = grouped_batch_lengths(counts, 16, 16, 8, seed=7, stream=2)
    assert _mean(dist) == pytest.approx(float(np.mean(real)), rel=0.01)


def test_eval_batches_are_sorted_chunks() -> None:
    """evaluate.py: longest first, chunks of eval_batch_size, each padded to its first."""
    counts = {3: 5, 10: 2, 30: 1}  # longest first: 30 10 10 3 3 3 3 3
    assert eval_batches(counts, 3, 8) == {(3, 32): 1, (3, 8): 1, (2, 8): 1}
    assert eval_batches(counts, 8, 1) == {(8, 30): 1}


class _Lengths:
    """What evaluate's batching reads of a split: its length and token lengths."""

    def __init__(self, lengths: np.ndarray) -> None:
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_eval_batches_mirror_evaluate(batch: int) -> None:
    """The estimate's evaluation batches are evaluate's own, and they run longest first
    (the first batch lays out the largest blocks; train/evaluate.py)."""
    from bitblend.train.evaluate import _batches

    lengths = np.random.default_rng(batch).integers(1, 129, size=300)
    n, batches = _batches(_Lengths(lengths), 250, batch)  # type: ignore[arg-type]
    assert n == 250 and sorted(np.concatenate(batches).tolist()) == list(range(250))
    longest = [int(lengths[b].max()) for b in batches]
    assert longest == sorted(longest, reverse=True)
    real = Counter((len(b), padded(int(lengths[b].max()), 8)) for b in batches)
    assert eval_batches(dict(Counter(lengths[:250].tolist())), batch, 8) == real


def _short_texts(tmp_path: Path, words: int) -> Path:
    path = tmp_path / f"short{words}.csv"
    rng = np.random.default_rng(0)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(200):
            n = int(rng.integers(1, words + 1))
            words_ = (["news", "sport", "market"][(i + j) % 3] for j in range(n))
            w.writerow([" ".join(words_), i % 2])
    return path


def test_short_texts_are_estimated_faster_than_the_worst_case(tmp_path: Path) -> None:
    """Texts of 1-6 words at max_length 64: steps and evaluations are priced at their
    padded lengths (8-16 positions), far below 64 - and the step time is flops.step_time's
    at those shapes, not at max_length. (tiny-bert's step is mostly per-op overhead, which
    no length changes: the length-bound parts are compared.)"""
    data = str(_short_texts(tmp_path, 6))
    recipe = make_recipe(f"tasks.0.data={data}", "model.max_length=64", "train.eval_every=4")
    est = estimate_recipe(recipe, precision="recipe", device=CPU, peaks=FAKE)
    (p,) = est.priced
    assert p.measured and p.worst == 64
    assert set(p.train) <= {8, 16} and p.mean_train <= 16
    assert p.mean_eval <= 16
    row = est.rows[0]
    task = est.tasks[0]
    full_time = step_time(
        est.shape, task, row.spec, activation_bytes(est.shape, task, row.spec), FAKE
    )
    full = full_time.total
    for part in ("matmul", "attention", "elementwise"):
        assert row.time.parts[part] < 0.3 * full_time.parts[part]
    assert row.time.parts["optimizer"] == pytest.approx(full_time.parts["optimizer"])
    at = {
        L: step_time(
            est.shape, replace(task, seq=L), row.spec,
            activation_bytes(est.shape, replace(task, seq=L), row.spec), FAKE,
        ).total
        for L in p.train
    }  # fmt: skip
    assert row.time.total == pytest.approx(sum(q * at[L] for L, q in p.train.items()))
    worst = estimate_recipe(
        recipe, precision="recipe", device=CPU, peaks=FAKE, lengths=[None]
    ).rows[0]
    assert worst.time.total == pytest.approx(full)
    assert row.eval_time < worst.eval_time
    # memory stays at the worst case: the longest batch a run can meet
    assert row.memory.peak == worst.memory.peak


def test_pad_to_multiple_of_moves_the_priced_length(tmp_path: Path) -> None:
    data = str(_short_texts(tmp_path, 6))
    sets = (f"tasks.0.data={data}", "model.max_length=64")
    est = {
        m: estimate_recipe(
            make_recipe(*sets, f"train.pad_to_multiple_of={m}"),
            precision="recipe",
            device=CPU,
            peaks=FAKE,
        )
        for m in (1, 32)
    }
    assert set(est[32].priced[0].train) == {32}
    assert est[1].priced[0].mean_train < 12
    assert est[1].rows[0].time.total < est[32].rows[0].time.total


def test_packed_causal_lm_stays_at_full_length(tmp_path: Path) -> None:
    """Packed rows are max_length tokens (the last one aside): priced at full length, where
    the same short documents unpacked run short batches."""
    data = str(_short_texts(tmp_path, 6))
    base = (f"tasks.0.data={data}", "model.backbone=tiny-gpt", "tasks.0.head=causal_lm",
            "model.max_length=32")  # fmt: skip
    packed = estimate_recipe(make_recipe(*base), precision="recipe", device=CPU, peaks=FAKE)
    p = packed.priced[0]
    assert p.measured and p.train == {32: 1.0}
    loose = estimate_recipe(
        make_recipe(*base, "tasks.0.packing=false"), precision="recipe", device=CPU, peaks=FAKE
    )
    assert loose.priced[0].mean_train < 28  # tiny-gpt: a few tokens per word
    assert loose.rows[0].time.total < packed.rows[0].time.total


def test_lengths_are_those_train_encodes_and_survive_json() -> None:
    """The runtime child's lengths: the encoded splits' token counts (at most max_length),
    the eval split's first eval_max_examples only, through JSON unchanged."""
    recipe = make_recipe()
    (lengths,) = encoded_lengths(recipe, load_data(recipe))
    assert lengths is not None
    assert max(lengths.train) <= 32 and sum(lengths.eval.values()) == 32
    assert TaskLengths.from_json(lengths.to_json()) == lengths
    limited: Any = encoded_lengths(make_recipe("train.eval_max_examples=8"), load_data(recipe))
    assert sum(limited[0].eval.values()) == 8


def test_warmup_prices_the_pages_a_run_grows_by() -> None:
    """The first steps fault in every page between the runtime and the process peak: from
    the recycled pool (pages freed lately, still backed) up to the size the probe met, at
    the cold cost past it; `warmup_cold` is the same growth with no pool. On a tuned heap
    every evaluation's releases add a step's and an evaluation's transient pages, which
    come back from the pages just freed: at the recycled cost."""
    cold, recycled = 1e-5, 1e-6
    peaks = replace(FAKE, page_fault=cold, recycled_page=recycled)
    recipe = make_recipe("train.eval_every=4")
    alone = estimate_recipe(recipe, precision="recipe", device=CPU, peaks=peaks)
    row = alone.rows[0]  # no pool met: the growth all cold
    grown = alone.total_bytes(row) - alone.runtime_bytes
    mem = row.memory
    transient = mem.peak - mem.resident + row.high_water.eval - mem.resident
    refault = row.evals * transient * (1 + CPU_ALLOCATOR_SLACK)
    assert grown > 0 and transient > 0 and row.evals > 1
    assert row.warmup == pytest.approx((grown * cold + refault * recycled) / PAGE)
    assert row.warmup_cold == pytest.approx(row.warmup)
    half = grown // 2  # a pool of half the growth: that half at the recycled cost
    pooled = estimate_recipe(
        recipe, precision="recipe", device=CPU, peaks=replace(peaks, recycled_bytes=half)
    ).rows[0]
    assert pooled.warmup == pytest.approx(
        (half * recycled + (grown - half) * cold + refault * recycled) / PAGE
    )
    assert pooled.warmup_cold == pytest.approx(row.warmup)
    assert pooled.warmup_cold > pooled.warmup
    old_cache = replace(peaks, recycled_page=0.0, recycled_bytes=10 * grown)  # no pool read
    assert estimate_recipe(
        recipe, precision="recipe", device=CPU, peaks=old_cache
    ).rows[0].warmup == pytest.approx((grown + refault) * cold / PAGE)  # fmt: skip
    untuned = estimate_recipe(
        make_recipe("train.eval_every=4", "train.cpu_heap=false"), precision="recipe",
        device=CPU, peaks=peaks,
    ).rows[0]  # fmt: skip
    assert untuned.warmup == pytest.approx(grown * cold / PAGE)
    assert row.run_time == pytest.approx(
        row.steps * row.mean_time + row.evals * row.eval_time + row.warmup
    )
    unprobed = estimate_recipe(recipe, precision="recipe", device=CPU, peaks=FAKE).rows[0]
    assert unprobed.warmup == 0 and unprobed.mean_time == pytest.approx(row.mean_time)


def test_first_touch_probe_reads_a_page_fault() -> None:
    seconds = first_touch(4 * 2**20, 16 * 2**20).cold
    assert 1e-8 < seconds < 1e-3  # per 4 KiB page: ns (a bare page zeroing) to ~30 us (a VM)


def _clock(durations: list[float]) -> Any:
    """A clock whose successive (start, stop) readings span `durations`."""
    ticks = [0.0]
    for d in durations:
        ticks += [ticks[-1], ticks[-1] + d]
    it = iter(ticks[1:])
    return lambda: next(it)


def test_first_touch_probe_goes_past_the_recycled_pool() -> None:
    """Recycled pages (freed lately, still backed) are cheap; the probe goes on until three
    chunks in a row are dear and prices the last two: the first is the pool's edge, part
    recycled (measured: 6-24 us a page beside 26-45 after it); a machine with nothing dear
    reads its slowest chunk within the size cap."""
    pages = 2**20 // PAGE  # 1 MiB chunks
    touch = first_touch(2**20, 64 * 2**20, clock=_clock([1, 1, 1, 6, 30, 34, 99]))
    assert touch.found_cold and touch.cold == pytest.approx(32 / pages)  # not 18 with the edge
    assert touch.warm == pytest.approx(1 / pages)
    assert touch.pool_bytes == 3 * 2**20  # the chunks before the dear ones
    # two dear chunks then a cheap one: not past the pool yet, the probe goes on
    late = first_touch(2**20, 64 * 2**20, clock=_clock([1, 9, 9, 1, 1, 9, 9, 9, 99]))
    assert late.found_cold and late.cold == pytest.approx(9 / pages)
    assert late.pool_bytes == 5 * 2**20
    flat = first_touch(2**20, 4 * 2**20, clock=_clock([1, 2, 1, 1, 9]))
    assert not flat.found_cold and flat.cold == pytest.approx(2 / pages)  # 4 chunks only
    assert flat.pool_bytes == 4 * 2**20  # all it touched: a lower bound of the pool


def test_first_touch_probe_touches_at_most_a_quarter_of_the_available_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past a 1 GiB pool the default cap is 2 GiB; on a machine with little memory free it
    is a quarter of MemAvailable, so the probe never presses a small machine."""
    from bitblend.estimate import first_touch as module

    monkeypatch.setattr(module, "mem_available_bytes", lambda: 16 * 2**20)
    flat = first_touch(2**20, clock=_clock([1] * 8))
    assert not flat.found_cold and flat.pool_bytes == 4 * 2**20  # 16 MiB / 4
    monkeypatch.setattr(module, "mem_available_bytes", lambda: None)  # no /proc/meminfo
    monkeypatch.setattr(module, "FAULT_MAX_BYTES", 6 * 2**20)  # the cap, made small here
    capped = first_touch(2**20, budget=60, clock=_clock([1] * 8))
    assert capped.pool_bytes == 6 * 2**20


def test_cli_prints_and_reports_the_priced_lengths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bitblend estimate` says which lengths it priced; --json has them per task."""
    monkeypatch.setenv("BITBLEND_ESTIMATE_RUNTIME", "self")  # no runtime child
    data = str(_short_texts(tmp_path, 6))
    argv = ["estimate", "tiny", "--precision", "recipe", "--set", "train.device=cpu",
            "--set", f"tasks.0.data={data}", "--set", "tasks.0.max_examples=null"]  # fmt: skip
    code, text, err = run_cli(argv, capsys)
    assert code == 0, err
    text = " ".join(text.split())
    code, out, err = run_cli([*argv, "--json"], capsys)
    assert code == 0, err
    priced = json.loads(out)["tasks"][0]["priced"]
    assert priced["source"] == "data" and priced["worst_positions"] == 64
    assert priced["mean_train_positions"] <= 16
    assert sum(priced["train_positions"].values()) == pytest.approx(1.0)
    mean = round(priced["mean_train_positions"])
    assert f"mean padded length per step: bbc_news {mean} of 64" in text
    # a short run (the recipe's steps, one task) is priced at the batches it draws
    assert priced["run_batches"] > 0
    assert f"the run's {priced['run_batches']} batches" in text


def test_tasks_without_text_keep_their_fixed_positions() -> None:
    """Image patches have no length distribution: every row is the same number of
    positions, priced as such (and said to be fixed, not unknown)."""
    recipe = make_recipe("tasks.0.data=digits", "tasks.0.patch_size=4")
    (p,) = estimate_recipe(recipe, precision="recipe", device=CPU, peaks=FAKE).priced
    assert p.source == "fixed" and p.train == {4: 1.0} and p.worst == 4


def test_the_bandwidth_is_a_typical_rate_not_a_burst() -> None:
    """The time model prices elementwise traffic at the add's typical rate: a median of
    its timings, which one burst (the 0.1 s call below) does not move; the peaks' best
    reading would take it."""
    from bitblend.estimate.probe import _best_rate, _median_rate

    typical = _median_rate(lambda: None, 10.0, CPU, 0.0, clock=_clock([1, 1, 0.1, 1, 2]))
    assert typical == pytest.approx(10.0)
    assert _best_rate(lambda: None, 10.0, CPU, 0.0, clock=_clock([1, 1, 0.1])) == pytest.approx(100)
