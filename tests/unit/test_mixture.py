"""Mixture strategies: target math, golden interleavings, prefix bounds, dynamic, resume."""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import numpy as np
import pytest

from bitblend.config.schema import MixingConfig
from bitblend.data.mixture import Mixture, TaskMixer, base_shares, block_edges

NAMES = ["a", "b", "c", "d", "e", "f"]
SIZES = [2000, 5000, 20000, 800, 12000]
# Shares on which the plain largest-deficit rule falls 1.17 steps behind (found by search).
SKEWED = [0.455965, 0.003974, 0.421202, 0.028356, 0.090001, 0.000502]
ALL = ["proportional", "uniform", "temperature", "weights", "round_robin", "sequential", "dynamic"]


def make(
    strategy: str, sizes: list[int] = SIZES, steps: int = 1000, seed: int = 3, **kw: Any
) -> Mixture:
    """A mixture over the first len(sizes) task names; `weights` gets a default."""
    names = NAMES[: len(sizes)]
    if strategy == "weights" and "weights" not in kw:
        kw["weights"] = {n: float(i + 1) for i, n in enumerate(names)}
    return Mixture(MixingConfig(strategy=strategy, **kw), names, sizes, seed, steps)


def draw(m: Mixture, start: int, stop: int, batch: int | None = None) -> list[Any]:
    """Steps start..stop-1: tasks (homogeneous) or per-task counts (mixed, `batch`)."""
    if batch is None:
        return [m.task_at(s) for s in range(start, stop)]
    return [m.allocate(s, batch) for s in range(start, stop)]


# -- target shares -------------------------------------------------------------------------


def test_proportional_uniform_and_size_cap() -> None:
    total = sum(SIZES)
    assert make("proportional").targets() == pytest.approx([n / total for n in SIZES])
    assert make("uniform").targets() == [0.2] * 5
    capped = [min(n, 5000) for n in SIZES]  # T5's K: big sources stop dominating
    assert make("proportional", size_cap=5000).targets() == pytest.approx(
        [n / sum(capped) for n in capped]
    )


def test_temperature_math() -> None:
    proportional = make("proportional").targets()
    assert make("temperature", temperature=1.0).targets() == pytest.approx(proportional)
    assert make("temperature", temperature=1e9).targets() == pytest.approx([0.2] * 5, abs=1e-6)
    root = np.sqrt(SIZES)
    assert make("temperature", temperature=2.0).targets() == pytest.approx(root / root.sum())
    capped = np.minimum(SIZES, 4000) ** (1 / 3)
    got = make("temperature", temperature=3.0, size_cap=4000).targets()
    assert got == pytest.approx(capped / capped.sum())
    # Higher temperature flattens: the largest share falls, the smallest rises.
    t2, t4 = make("temperature", temperature=2.0).targets(), make("temperature", temperature=4.0)
    assert max(t4.targets()) < max(t2) and min(t4.targets()) > min(t2)


def test_weights_are_normalised() -> None:
    cfg = MixingConfig(strategy="weights", weights={"a": 2.0, "b": 6.0, "c": 0.0})
    assert base_shares(cfg, ["a", "b", "c"], [1, 1, 1]) == [0.25, 0.75, 0.0]
    scaled = MixingConfig(strategy="weights", weights={"a": 20.0, "b": 60.0, "c": 0.0})
    assert base_shares(scaled, ["a", "b", "c"], [5, 6, 7]) == [0.25, 0.75, 0.0]
    m = Mixture(cfg, ["a", "b", "c"], [9, 9, 9], 0, 100)
    assert 2 not in [m.task_at(s) for s in range(100)]  # weight 0: never drawn
    with pytest.raises(ValueError, match="weight for each"):
        base_shares(MixingConfig(strategy="weights", weights={"a": 1.0}), ["a", "b"], [1, 1])


def test_sequential_blocks_are_proportional_and_cover_the_run() -> None:
    assert block_edges([0.1, 0.3, 0.6], 50) == [5, 20, 50]
    assert block_edges([1 / 3] * 3, 10) == [3, 7, 10]
    m = make("sequential", sizes=[100, 300, 600], steps=50)
    assert draw(m, 0, 53) == [0] * 5 + [1] * 15 + [2] * 30 + [2] * 3  # past the end: last
    assert m.targets() == [0.0, 0.0, 1.0]
    mixed = make("sequential", sizes=[100, 300, 600], steps=50)
    assert draw(mixed, 0, 6, batch=4) == [[4, 0, 0]] * 5 + [[0, 4, 0]]
    assert [mixed.allocate(s, 4) for s in (6, 20)] == [[0, 4, 0], [0, 0, 4]]


# -- golden counts -------------------------------------------------------------------------


def test_interleaved_golden_sequence_and_counts() -> None:
    """Sizes 1:2:5 give shares 1/8, 2/8, 5/8: the sequence repeats every 8 steps."""
    m = make("proportional", sizes=[10, 20, 50])
    assert draw(m, 0, 16) == [2, 2, 1, 2, 2, 0, 1, 2] * 2
    assert m.counts == [2, 4, 10]
    t = make("temperature", temperature=2.0)
    seq = draw(t, 0, 1000)
    assert seq[:20] == [2, 4, 1, 2, 4, 2, 0, 4, 1, 2, 3, 2, 4, 1, 2, 0, 4, 2, 4, 1]
    assert t.counts == [113, 179, 359, 71, 278]  # targets x 1000: 113.3 179.2 358.3 71.7 277.6


def test_mixed_golden_allocation() -> None:
    m = make("proportional", sizes=[10, 20, 50], batches="mixed")
    assert draw(m, 0, 4, batch=8) == [[1, 2, 5]] * 4
    t = make("temperature", batches="mixed")
    assert draw(t, 0, 5, batch=32) == [
        [3, 6, 12, 2, 9],
        [4, 6, 11, 2, 9],
        [4, 5, 12, 2, 9],
        [3, 6, 11, 3, 9],
        [4, 6, 12, 2, 8],
    ]
    assert t.counts == [18, 29, 58, 11, 44]


def test_round_robin_cycles_steps_and_examples() -> None:
    m = make("round_robin", sizes=[5, 50, 500])
    assert draw(m, 0, 7) == [0, 1, 2, 0, 1, 2, 0]
    mixed = make("round_robin", sizes=[5, 50, 500], batches="mixed")
    assert draw(mixed, 0, 3, batch=4) == [[2, 1, 1], [1, 2, 1], [1, 1, 2]]


def test_random_order_is_pure_and_binomially_right() -> None:
    n = 20_000
    m = make("temperature", order="random")
    seq = draw(m, 0, n)
    # A pure function of (seed, step): no dependence on what was drawn before.
    fresh = make("temperature", order="random")
    assert [fresh.task_at(s) for s in (n - 1, 5, 17)] == [seq[n - 1], seq[5], seq[17]]
    assert draw(make("temperature", order="random", seed=4), 0, 60) != seq[:60]
    counts = Counter(seq)
    for i, p in enumerate(m.targets()):
        assert abs(counts[i] - n * p) < 4 * math.sqrt(n * p * (1 - p)), (i, counts[i], n * p)
    mixed = make("temperature", order="random", batches="mixed")
    alloc = np.array(draw(mixed, 0, 2000, batch=16))
    assert (alloc.sum(axis=1) == 16).all()
    total, p = 2000 * 16, np.array(mixed.targets())
    assert np.all(np.abs(alloc.sum(axis=0) - total * p) < 4 * np.sqrt(total * p * (1 - p)))


# -- realised share on every prefix --------------------------------------------------------


def assert_prefix_bound(m: Mixture, steps: int, batch: int | None = None) -> None:
    """|count_i - target_i x units| < 1 after every step (units = steps or examples)."""
    shares = np.array(m.targets())
    counts = np.zeros(m.k)
    for s in range(steps):
        if batch is None:
            counts[m.task_at(s)] += 1
        else:
            counts += m.allocate(s, batch)
        lag = np.abs(counts - shares * counts.sum())
        assert lag.max() < 1 + 1e-9, (s, lag.max())
    assert list(counts) == m.counts


@pytest.mark.parametrize("strategy", ["proportional", "temperature", "weights", "uniform"])
@pytest.mark.parametrize("batch", [None, 1, 7, 32])
def test_interleaved_prefix_bound(strategy: str, batch: int | None) -> None:
    assert_prefix_bound(make(strategy, size_cap=9000), 1500 if batch is None else 200, batch)


def test_round_robin_prefix_bound() -> None:
    assert_prefix_bound(make("round_robin"), 503)
    assert_prefix_bound(make("round_robin", batches="mixed"), 100, batch=7)


@pytest.mark.parametrize("batch", [None, 5])
def test_prefix_bound_where_largest_deficit_fails(batch: int | None) -> None:
    weights = dict(zip(NAMES, SKEWED, strict=True))
    assert_prefix_bound(make("weights", sizes=[1] * 6, weights=weights), 1500, batch)


def test_sequential_follows_the_block_schedule_exactly() -> None:
    m = make("sequential", steps=400)
    edges = block_edges(base_shares(m.cfg, m.names, m.sizes), 400)
    for s in range(400):
        task = m.task_at(s)
        assert task == sum(s >= e for e in edges)  # the block containing step s
        want = [max(0, min(s + 1, e) - lo) for lo, e in zip([0, *edges[:-1]], edges, strict=True)]
        assert m.counts == want
    assert m.counts == [e - lo for lo, e in zip([0, *edges[:-1]], edges, strict=True)]


# -- dynamic -------------------------------------------------------------------------------


def test_dynamic_update_rule_exactly() -> None:
    m = make("dynamic", sizes=[100, 400], dynamic_eta=0.5, dynamic_floor=0.1)
    w0 = m.targets()
    assert w0 == pytest.approx([1 / 3, 2 / 3])  # temperature 2: sqrt(100) : sqrt(400)
    m.observe(50, {0: 3.0, 1: 1.0})  # mean 2: z = (0.5, -0.5)
    raw = [w0[0] * math.exp(0.25), w0[1] * math.exp(-0.25)]
    want = [(1 - 2 * 0.1) * x / sum(raw) + 0.1 for x in raw]
    assert m.targets() == pytest.approx(want, rel=1e-12)


def test_dynamic_shifts_toward_a_task_held_high_and_keeps_the_floor() -> None:
    m = make("dynamic", dynamic_floor=0.05, dynamic_every=10)
    start = m.targets()
    for s in range(400):
        m.task_at(s)
        if (s + 1) % 10 == 0:
            m.observe(s + 1, {0: 5.0, 1: 1.0, 2: 0.5, 3: 1.0, 4: 0.8})  # task a stays high
    after = m.targets()
    assert after[0] > 0.7 > start[0]
    assert min(after) >= 0.05 - 1e-12
    assert sum(after) == pytest.approx(1.0)
    assert Counter(draw(m, 400, 500))[0] >= 70  # the trained share followed
    # Realised counts follow the cumulative (changing) target: never ahead by a step.
    assert max(c - e for c, e in zip(m.counts, m.expected(), strict=True)) < 1
    assert max(abs(c - e) for c, e in zip(m.counts, m.expected(), strict=True)) < 1.5


def test_dynamic_ignores_bad_losses_and_other_strategies() -> None:
    m = make("dynamic", sizes=[100, 100, 100])
    m.observe(1, {0: math.nan, 1: math.inf, 2: 2.0})  # one finite loss: z = 0 for all
    assert m.targets() == pytest.approx([1 / 3] * 3)
    m.observe(2, {})
    assert m.targets() == pytest.approx([1 / 3] * 3)
    t = make("temperature")
    before = t.targets()
    t.observe(1, {0: 9.0, 1: 1.0})
    assert t.targets() == before


# -- resume --------------------------------------------------------------------------------


def run(m: Mixture, start: int, stop: int, batch: int | None) -> list[Any]:
    """Draw steps start..stop-1, with held-out losses every 7 steps for dynamic."""
    out = []
    for s in range(start, stop):
        out.append(m.task_at(s) if batch is None else m.allocate(s, batch))
        if (s + 1) % 7 == 0:
            m.observe(s + 1, {i: 1.0 + ((s + i) % 5) / 2 for i in range(m.k)})
    return out


@pytest.mark.parametrize("strategy", ALL)
@pytest.mark.parametrize("order", ["interleaved", "random"])
@pytest.mark.parametrize("batch", [None, 12])
def test_state_dict_round_trip_continues_identically(
    strategy: str, order: str, batch: int | None
) -> None:
    straight = make(strategy, steps=90, order=order)
    want = run(straight, 0, 90, batch)
    first = make(strategy, steps=90, order=order)
    run(first, 0, 41, batch)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON data, nothing else
    resumed = make(strategy, steps=90, order=order)
    resumed.load_state_dict(state)
    assert run(resumed, 41, 90, batch) == want[41:]
    assert resumed.state_dict() == straight.state_dict()
    assert resumed.realised() == straight.realised()


def test_load_state_rejects_another_run_and_reads_the_old_form() -> None:
    m = make("proportional")
    with pytest.raises(ValueError, match="tasks"):
        make("proportional", sizes=[1, 2]).load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match="strategy"):
        make("uniform").load_state_dict(m.state_dict())
    draw(m, 0, 30)
    old = {k: m.state_dict()[k] for k in ("counts", "weights", "steps")}  # before anchors
    resumed = make("proportional")
    resumed.load_state_dict(old)
    assert draw(resumed, 30, 80) == draw(m, 30, 80)


def test_interleaved_refuses_a_skipped_step() -> None:
    m = make("proportional")
    draw(m, 0, 3)
    with pytest.raises(ValueError, match="in order"):
        m.task_at(5)


def test_task_mixer_wrapper_still_works() -> None:
    mixer = TaskMixer("proportional", [10, 30], seed=0)
    seq = [mixer.task_at(s) for s in range(4000)]
    assert mixer.shares == [0.25, 0.75]
    assert abs(seq.count(0) / 4000 - 0.25) < 0.03
    assert [TaskMixer("round_robin", [1, 1, 1], 0).task_at(s) for s in (4, 5)] == [1, 2]
