"""BatchSampler: resume, no repeats within an epoch (next and take), rank slices, epochs."""

from __future__ import annotations

import numpy as np
import pytest

from bitblend.data.sampler import BatchSampler


def lengths(n: int, seed: int = 0) -> np.ndarray:
    """Token counts between 5 and 120, like a text dataset."""
    return np.random.default_rng(seed).integers(5, 121, size=n)


def batches(s: BatchSampler, n: int) -> list[list[int]]:
    return [s.next().tolist() for _ in range(n)]


def takes(s: BatchSampler, sizes: list[int]) -> list[list[int]]:
    return [s.take(k).tolist() for k in sizes]


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("cut", [0, 9, 18, 19, 25])
def test_resume_mid_epoch_yields_identical_batches(group: bool, world: int, cut: int) -> None:
    L = lengths(300)  # 18 batches of 16 per epoch: cuts before, at and after the boundary

    def make() -> BatchSampler:
        return BatchSampler(L, 16, 5, 1, group, rank=world - 1, world_size=world)

    straight = batches(make(), 45)
    first = make()
    batches(first, cut)
    resumed = make()
    resumed.load_state_dict(dict(first.state_dict()))
    assert batches(resumed, 45 - cut) == straight[cut:]


@pytest.mark.parametrize("group", [True, False])
def test_take_never_repeats_within_an_epoch(group: bool) -> None:
    s = BatchSampler(lengths(203), 8, seed=1, stream=2, group_by_length=group)
    usable = s.batches_per_epoch * 8  # 200: the last 3 examples sit this epoch out
    drawn = [i for part in takes(s, [3, 7, 1, 0, 13] * 20) for i in part]  # 480: 2.4 epochs
    for e in range(2):
        epoch = drawn[e * usable : (e + 1) * usable]
        assert len(set(epoch)) == usable and all(0 <= i < 203 for i in epoch)
    assert s.epoch == 2 and s.epochs_completed == pytest.approx(480 / 200)


def test_take_spans_epochs_and_resumes_mid_batch() -> None:
    L = lengths(100)
    sizes = [5, 11, 0, 64, 3, 29, 150, 7]  # one take is longer than an epoch (96)
    straight = takes(BatchSampler(L, 16, 2, 0), sizes * 3)
    first = BatchSampler(L, 16, 2, 0)
    takes(first, sizes[:5])  # 83 examples: mid-batch (offset 3)
    assert first.state_dict()["offset"] == 83 % 16
    resumed = BatchSampler(L, 16, 2, 0)
    resumed.load_state_dict(first.state_dict())
    assert takes(resumed, (sizes * 3)[5:]) == straight[5:]
    assert [len(p) for p in straight] == sizes * 3
    assert BatchSampler(L, 16, 2, 0).take(0).shape == (0,)


@pytest.mark.parametrize("group", [True, False])
def test_no_repeats_within_an_epoch_with_next(group: bool) -> None:
    s = BatchSampler(lengths(1003), 10, seed=0, stream=0, group_by_length=group)
    for _ in range(2):
        flat = [i for b in batches(s, s.batches_per_epoch) for i in b]
        assert len(flat) == len(set(flat)) == 1000


def test_next_after_a_partial_take_skips_the_rest_without_repeats() -> None:
    s = BatchSampler(lengths(160), 16, seed=3, stream=0)
    seen = s.take(5).tolist() + s.next().tolist() + s.take(20).tolist()
    assert len(seen) == len(set(seen)) == 41
    assert (s.epoch, s.cursor, s.offset) == (0, 3, 4)


def test_rank_slices_are_disjoint_and_their_union_is_the_global_batch() -> None:
    L = lengths(500)
    whole = BatchSampler(L, 24, seed=2, stream=1)
    for world in (2, 3, 4):
        ranks = [BatchSampler(L, 24, 2, 1, rank=r, world_size=world) for r in range(world)]
        ref = BatchSampler(L, 24, seed=2, stream=1)
        for _ in range(25):  # crosses an epoch (20 batches)
            parts = [r.next().tolist() for r in ranks]
            assert [i for p in parts for i in p] == ref.next().tolist()
            assert all(len(p) == 24 // world for p in parts)
        # take(k) is global: the ranks together consume k examples, in parts differing by
        # at most one (a rank gets none when k < world).
        for k in (5, 1, 7):
            parts = [r.take(k).tolist() for r in ranks]
            assert [i for p in parts for i in p] == ref.take(k).tolist()
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert whole.batches_per_epoch == 20


def test_a_rank_resumes_from_any_world_size_state() -> None:
    """Position is global, so the slice is a function of (seed, position, rank, world)."""
    L = lengths(400)
    single = BatchSampler(L, 16, seed=7, stream=3)
    batches(single, 30)
    rank = BatchSampler(L, 16, 7, 3, rank=2, world_size=4)
    rank.load_state_dict(single.state_dict())
    assert rank.next().tolist() == single.next().tolist()[8:12]


def test_set_rank_keeps_the_global_position() -> None:
    L = lengths(400)
    single = BatchSampler(L, 16, seed=7, stream=3)
    batches(single, 3)
    rank = BatchSampler(L, 16, seed=7, stream=3)
    batches(rank, 3)
    rank.set_rank(1, 2)
    assert rank.next().tolist() == single.next().tolist()[8:]
    with pytest.raises(ValueError, match="divisible"):
        rank.set_rank(0, 3)


def test_epochs_completed_is_fractional() -> None:
    s = BatchSampler(lengths(100), 10, seed=0, stream=0)
    assert s.epochs_completed == 0.0
    batches(s, 25)
    assert s.epochs_completed == pytest.approx(2.5)
    s.take(4)
    assert s.epochs_completed == pytest.approx(2.54)


def test_returned_indices_are_copies() -> None:
    s = BatchSampler(lengths(64), 8, seed=0, stream=0)
    first = s.next()
    first[:] = -1  # a caller editing its batch in place must not change the replay
    s.load_state_dict({"epoch": 0, "cursor": 0, "seed": 0})
    assert (s.next() >= 0).all()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="divisible"):
        BatchSampler(lengths(100), 10, 0, 0, world_size=4)
    with pytest.raises(ValueError, match="out of range"):
        BatchSampler(lengths(100), 8, 0, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchSampler(lengths(5), 8, 0, 0)
    with pytest.raises(ValueError, match="k >= 0"):
        BatchSampler(lengths(50), 8, 0, 0).take(-1)
