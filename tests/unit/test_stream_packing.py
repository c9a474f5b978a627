"""Packed streams (data/stream_loader.py with packing): the in-memory packer's rows over the
same documents, split by rank and worker, resumed mid-row bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitblend.data.modalities import collate, encode_packed
from bitblend.data.stream_loader import StreamedSplit, StreamSampler
from bitblend.data.streaming import StreamSource, find_shards
from bitblend.models.backbones import load_backbone_with_head
from tests.streaming_corpus import write_corpus

LENGTH = 24  # short rows: documents (byte tokens, 25-70 with EOS) span 2-4 rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("corpus") / "shards"
    texts = write_corpus(root, rows_per_shard=11)
    return root, texts


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_backbone_with_head("tiny-gpt", None, 0.0, 0.0, "auto")[1]


def _sampler(
    src: StreamSource, tok: Any, batch: int, workers: int, head: str = "causal_lm"
) -> StreamSampler:
    split = StreamedSplit(head, np.zeros(0), np.zeros(0, np.int64), estimate=10)
    return StreamSampler(split, src, tok, LENGTH, batch, workers, seed=0, packed=True)


def _rows(s: StreamSampler, plan: list[Any]) -> list[list[tuple[list[int], list[int]]]]:
    out = []
    for p in plan:
        idx = s.next() if p == "next" else s.take(p)
        assert s.split.ids is not None and s.split.segments is not None
        out.append([(s.split.ids[i], s.split.segments[i]) for i in idx])
    return out


def test_packed_stream_equals_in_memory_packing(
    corpus: tuple[Path, list[str]], tokenizer: Any
) -> None:
    """Unshuffled, the stream's packed rows are encode_packed's rows over the same texts
    (its last partial row aside: the stream goes on into epoch 2), and collate gives both
    the same segment ids, per-document positions and labels."""
    root, texts = corpus
    src = StreamSource(find_shards(str(root), "data"), "text", seed=0, shuffle_buffer=0)
    mem = encode_packed(tokenizer, texts, "causal_lm", LENGTH, np.zeros(0))
    assert mem.ids is not None and mem.segments is not None
    full = len(mem.ids) - 1
    assert len(mem.ids[-1]) < LENGTH and full > 20
    s = _sampler(src, tokenizer, 4, 0)
    got = [row for batch in _rows(s, [full]) for row in batch]
    s.close()
    assert [ids for ids, _ in got] == mem.ids[:full]
    assert [seg for _, seg in got] == mem.segments[:full]
    a = collate(s.split, np.arange(8), 0, 1)
    b = collate(mem, np.arange(8), 0, 1)
    assert a.keys() == b.keys() and "position_ids" in a
    assert all(bool((a[k] == b[k]).all()) for k in a)


PLAN = ["next", 5, "next", 3, 1, "next", 7]


@pytest.mark.parametrize(("world", "workers"), [(2, 2), (3, 1)])
def test_packed_rank_and_worker_split(
    corpus: tuple[Path, list[str]], tokenizer: Any, world: int, workers: int
) -> None:
    """Ranks x workers together hand out exactly the one-process packed rows."""
    root, _ = corpus
    src = StreamSource(find_shards(str(root), "data"), "text", seed=5, shuffle_buffer=8)
    one = _rows(_sampler(src, tokenizer, 6, 0), PLAN)
    per_rank = []
    for rank in range(world):
        s = _sampler(src, tokenizer, 6, workers)
        s.set_rank(rank, world)
        per_rank.append(_rows(s, PLAN))
        s.close()
    at = 0  # global rows before this call: row at + p belongs to rank (at + p) % world
    for call, rows in enumerate(one):
        its = [iter(per_rank[r][call]) for r in range(world)]
        merged = [next(its[(at + p) % world]) for p in range(len(rows))]
        assert merged == rows, call
        assert all(next(it, None) is None for it in its)
        at += len(rows)


@pytest.mark.parametrize(("workers", "head"), [(0, "causal_lm"), (2, "masked_lm")])
def test_packed_resume_mid_row_is_bit_for_bit(
    corpus: tuple[Path, list[str]], tokenizer: Any, workers: int, head: str
) -> None:
    """A checkpoint taken mid-row (the packer's carry-over and any full rows beyond the
    batch) resumes to the straight run's rows, across the epoch boundary; a second rank
    resumed from rank 0's state continues exactly too."""
    root, _ = corpus
    src = StreamSource(find_shards(str(root), "data"), "text", seed=2, shuffle_buffer=8)
    plan = ["next"] * 3 + [5] + ["next"] * 25
    straight = _rows(_sampler(src, tokenizer, 6, workers, head), plan)
    first = _sampler(src, tokenizer, 6, workers, head)
    _rows(first, plan[:4])
    state = json.loads(json.dumps(first.state_dict()))  # as the checkpoint stores it
    first.close()
    assert state["packer"]["ids"] and state["consumed"] == 23  # mid-row
    resumed = _sampler(src, tokenizer, 6, workers, head)
    resumed.load_state_dict(state)
    after = _rows(resumed, plan[4:])
    resumed.close()
    assert after == straight[4:]
    assert resumed.epochs_completed > 1.0  # the straight run crossed into epoch 2
    r1 = _sampler(src, tokenizer, 6, 0, head)
    r1.set_rank(1, 2)
    r1.load_state_dict(state)
    assert _rows(r1, ["next"])[0] == straight[4][0::2]  # rows 23, 25, 27: odd = rank 1
