"""Streamed sources (data/streaming.py, data/stream_loader.py): the reader against HF
datasets' own readers, seeded shuffling, exact resume, the rank x worker split, bad shards."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest

from bitblend.config.schema import TaskConfig
from bitblend.data.sources import load_task_data
from bitblend.data.stream_loader import StreamedSplit, StreamSampler
from bitblend.data.streaming import StreamSource, find_shards
from bitblend.errors import BitblendError
from bitblend.models.backbones import load_backbone_with_head
from tests.streaming_corpus import doc, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("corpus") / "shards"
    return root, write_corpus(root)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_backbone_with_head("tiny-gpt", None, 0.0, 0.0, "auto")[1]


def _hf_rows(path: Path) -> list[str]:
    """The texts of one shard as HF datasets' builders read them."""
    name = path.name
    kind = "parquet" if name.endswith(".parquet") else "text" if ".txt" in name else "json"
    ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    return [t for t in ds["text"] if t.strip()]


def test_stream_equals_the_in_memory_readers(corpus: tuple[Path, list[str]]) -> None:
    """Unshuffled, the stream's first epoch is every shard's rows as HF datasets reads them
    (json / parquet / text builders, .gz and .zst included), in file order; then epoch 2."""
    root, texts = corpus
    shards = find_shards(str(root), "data")
    assert len(shards) == 7
    expected = [t for p in shards for t in _hf_rows(p)]
    assert expected == texts
    src = StreamSource(shards, "text", seed=0, shuffle_buffer=0)
    got = [r for _, r in zip(range(len(texts) + 5), src.rows(), strict=False)]
    assert [r.row["text"] for r in got[: len(texts)]] == expected
    assert [r.row["text"] for r in got[len(texts) :]] == expected[:5]
    assert [r.g for r in got] == list(range(len(texts) + 5))
    assert got[len(texts)].cursor.epoch == 1


def test_shuffled_epochs_are_seeded_permutations(corpus: tuple[Path, list[str]]) -> None:
    root, texts = corpus
    shards = find_shards(str(root / "*"), "data")  # a glob finds the same shards
    n = len(texts)

    def two_epochs(seed: int) -> list[str]:
        src = StreamSource(shards, "text", seed=seed, shuffle_buffer=16)
        return [r.row["text"] for _, r in zip(range(2 * n), src.rows(), strict=False)]

    a, b = two_epochs(3), two_epochs(4)
    assert a == two_epochs(3)
    assert sorted(a[:n]) == sorted(a[n:]) == sorted(texts)  # each epoch: every row once
    assert a[:n] != texts and a[:n] != a[n:] and a[:n] != b[:n]


def test_resume_from_a_cursor_mid_shard_and_mid_window(corpus: tuple[Path, list[str]]) -> None:
    root, texts = corpus
    src = StreamSource(find_shards(str(root), "data"), "text", seed=1, shuffle_buffer=16)
    rows = [r for _, r in zip(range(2 * len(texts)), src.rows(), strict=False)]
    for cut in (0, 20, 100, len(texts) - 1, len(texts) + 30):
        again = [r for _, r in zip(range(40), src.rows(rows[cut].cursor), strict=False)]
        assert [r.row for r in again] == [r.row for r in rows[cut + 1 : cut + 41]], cut


def _sampler(source: StreamSource, tok: Any, batch: int, workers: int) -> StreamSampler:
    split = StreamedSplit("causal_lm", np.zeros(0), np.zeros(0, np.int64), estimate=10)
    return StreamSampler(split, source, tok, 64, batch, workers, seed=0)


def _docs(sampler: StreamSampler, tok: Any, idx: np.ndarray) -> list[int]:
    """The doc numbers of a batch, read back from its token ids."""
    assert sampler.split.ids is not None
    return [int(tok.decode(sampler.split.ids[i]).split()[0][3:]) for i in idx]


PLAN = ["next", 5, "next", 3, 1, "next", 7]  # next(): a global batch of 6; ints: take(k)


def _run(sampler: StreamSampler, tok: Any, plan: list[Any]) -> list[list[int]]:
    out = []
    for p in plan:
        out.append(_docs(sampler, tok, sampler.next() if p == "next" else sampler.take(p)))
    return out


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2), (3, 1)])
def test_rank_and_worker_split_has_no_duplicates_or_gaps(
    corpus: tuple[Path, list[str]], tokenizer: Any, world: int, workers: int
) -> None:
    """Every call's rows over all ranks are exactly the one-process call's rows; ranks and
    DataLoader workers never repeat or drop a row (shuffled, across shard boundaries)."""
    root, _ = corpus
    src = StreamSource(find_shards(str(root), "data"), "text", seed=5, shuffle_buffer=16)
    one = _run(_sampler(src, tokenizer, 6, 0), tokenizer, PLAN)
    per_rank = []
    for rank in range(world):
        s = _sampler(src, tokenizer, 6, workers)
        s.set_rank(rank, world)
        per_rank.append(_run(s, tokenizer, PLAN))
        s.close()
    for call, rows in enumerate(one):
        merged = [d for r in range(world) for d in per_rank[r][call]]
        assert sorted(merged) == sorted(rows), call
    flat = [d for call in one for d in call]
    assert len(flat) == len(set(flat)) == 6 * 3 + 5 + 3 + 1 + 7


@pytest.mark.parametrize("workers", [0, 2])
def test_sampler_resume_reads_what_the_straight_run_reads(
    corpus: tuple[Path, list[str]], tokenizer: Any, workers: int
) -> None:
    root, texts = corpus
    src = StreamSource(find_shards(str(root), "data"), "text", seed=2, shuffle_buffer=16)
    plan = ["next"] * 3 + [4] + ["next"] * 60  # crosses shards and the epoch boundary
    straight = _sampler(src, tokenizer, 6, workers)
    full = _run(straight, tokenizer, plan)
    assert straight.epochs_completed > 1.0
    first = _sampler(src, tokenizer, 6, workers)
    _run(first, tokenizer, plan[:4])
    state = json.loads(json.dumps(first.state_dict()))  # as the checkpoint stores it
    first.close()
    assert state["cursor"][4] == 6 * 3 + 4 - 1 and state["consumed"] == 22
    resumed = _sampler(src, tokenizer, 6, workers)
    resumed.load_state_dict(state)
    assert _run(resumed, tokenizer, plan[4:]) == full[4:]
    assert resumed.split.ids == straight.split.ids  # the token ids themselves
    assert len(texts) < 6 * 63


def test_two_ranks_resume_from_rank_zero_state(
    corpus: tuple[Path, list[str]], tokenizer: Any
) -> None:
    """The checkpoint holds rank 0's state; rank 1 resumed from it continues exactly."""
    root, _ = corpus
    src = StreamSource(find_shards(str(root), "data"), "text", seed=2, shuffle_buffer=16)
    plan = ["next", 5, "next", 3, "next", "next"]
    ranks = []
    for rank in range(2):
        s = _sampler(src, tokenizer, 6, 0)
        s.set_rank(rank, 2)
        ranks.append(s)
    full = [_run(s, tokenizer, plan) for s in ranks]
    r0 = _sampler(src, tokenizer, 6, 0)
    r0.set_rank(0, 2)
    _run(r0, tokenizer, plan[:3])
    state = r0.state_dict()
    r1 = _sampler(src, tokenizer, 6, 0)
    r1.set_rank(1, 2)
    r1.load_state_dict(state)
    assert _run(r1, tokenizer, plan[3:]) == full[1][3:]


def _task(data: Path, **kw: Any) -> TaskConfig:
    opts: dict[str, Any] = {"name": "lm", "streaming": True, "stream_eval_rows": 4,
                            "head": "causal_lm"}  # fmt: skip
    return TaskConfig(data=str(data), **{**opts, **kw})


def test_streamed_task_holds_out_the_first_rows_for_eval(
    corpus: tuple[Path, list[str]],
) -> None:
    root, texts = corpus
    td = load_task_data(_task(root, shuffle_buffer=0), 0, 0)
    assert td.eval.text == texts[:4]
    rows = [r.row["text"] for _, r in zip(range(len(texts)), td.stream.rows(), strict=False)]
    assert rows[: len(texts) - 4] == texts[4:]  # held-out rows never train
    assert rows[len(texts) - 4 :] == texts[4:8]
    assert abs(td.stream.estimate - (len(texts) - 4)) <= 0.2 * len(texts)


def test_save_to_disk_directory_streams_its_arrow_files(tmp_path: Path) -> None:
    texts = [doc(i) for i in range(300)]
    datasets.Dataset.from_dict({"text": texts, "n": list(range(300))}).save_to_disk(
        str(tmp_path / "hf"), max_shard_size="8KB"
    )
    shards = find_shards(str(tmp_path / "hf"), "data")
    assert len(shards) > 1 and all(p.suffix == ".arrow" for p in shards)
    src = StreamSource(shards, "text", seed=0, shuffle_buffer=0)
    assert [r.row["text"] for _, r in zip(range(300), src.rows(), strict=False)] == texts
    td = load_task_data(_task(tmp_path / "hf", shuffle_buffer=0), 0, 0)
    assert td.eval.text == texts[:4] and td.stream.estimate == 296
    rows = [
        r.row["n"] for _, r in zip(range(40), td.stream.rows(rows_after(td, 250)), strict=False)
    ]
    assert rows == [*range(255, 300), *range(4, 9)][:40]


def rows_after(td: Any, g: int) -> Any:
    """The cursor of global row `g` of a task's stream (found by reading up to it)."""
    return next(r.cursor for r in td.stream.rows() if r.g == g)


def test_shards_under_the_threshold_load_in_memory(corpus: tuple[Path, list[str]]) -> None:
    root, texts = corpus
    td = load_task_data(_task(root, streaming=None), 0, 0)
    assert td.stream is None
    assert sorted([*td.train.text, *td.eval.text]) == sorted(texts)


def _bad(tmp: Path, name: str, content: bytes) -> Path:
    d = tmp / "bad"
    d.mkdir(exist_ok=True)
    (d / "a.jsonl").write_text("".join(json.dumps({"text": doc(i)}) + "\n" for i in range(20)))
    (d / name).write_bytes(content)
    return d


NOT_JSON = b'{"text": "doc99 fine"}\n{"text": oops}\n'
BAD = {
    "empty": ("b.jsonl", b"", r"b\.jsonl: the shard is empty; expected one JSON object"),
    "not-json": ("b.jsonl", NOT_JSON, r"b\.jsonl: line 2: invalid JSON"),
    "parquet": ("b.parquet", b"PAR1 this is no parquet", r"b\.parquet: not a readable Parquet"),
    "no-column": ("b.jsonl", b'{"body": "x"}\n', r"b\.jsonl: line 1: no column 'text' \("),
    "empty-gz": ("b.jsonl.gz", gzip.compress(b"\n"), r"b\.jsonl\.gz: the shard is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_shards_are_one_line_or_skipped_and_counted(tmp_path: Path, case: str) -> None:
    name, content, message = BAD[case]
    data = _bad(tmp_path, name, content)
    with pytest.raises(BitblendError, match=message) as err:  # at load, or when read
        td = load_task_data(_task(data), 0, 0)
        [r for _, r in zip(range(40), td.stream.rows(), strict=False)]
    assert "\n" not in str(err.value)
    td = load_task_data(_task(data, data_errors="skip", shuffle_buffer=0), 0, 0)
    rows = [r for _, r in zip(range(40), td.stream.rows(), strict=False)]
    assert all(r.row["text"].startswith("doc") for r in rows)
    assert rows[-1].skipped >= 1 and any(r.note and name in r.note for r in rows)
    in_memory = load_task_data(_task(data, streaming=False, data_errors="skip"), 0, 0)
    good = 20 + (case == "not-json")  # that shard's first line is fine
    assert in_memory.skipped == 1 and len(in_memory.train) + len(in_memory.eval) == good
    assert in_memory.skip_note is not None and name in in_memory.skip_note


def test_a_bad_row_mid_stream_stops_with_its_line(tmp_path: Path, tokenizer: Any) -> None:
    """Past what the pre-run checks read, a bad line reaches the trainer as the one line."""
    d = tmp_path / "mid"
    d.mkdir()
    lines = [json.dumps({"text": doc(i)}) for i in range(900)]
    lines[850] = "{not json"
    (d / "a.jsonl").write_text("\n".join(lines) + "\n")
    td = load_task_data(_task(d, shuffle_buffer=0), 0, 0)
    s = _sampler(td.stream, tokenizer, 50, 2)
    with pytest.raises(BitblendError, match=r"a\.jsonl: line 851: invalid JSON"):
        for _ in range(20):
            s.next()
    skip = load_task_data(_task(d, shuffle_buffer=0, data_errors="skip"), 0, 0)
    s = _sampler(skip.stream, tokenizer, 50, 0)
    for _ in range(20):
        s.next()
    assert s.skipped == 1 and s.first_note is not None and "line 851" in s.first_note
    s.close()


def test_non_lm_task_cannot_stream(corpus: tuple[Path, list[str]]) -> None:
    root, _ = corpus
    with pytest.raises(BitblendError, match=r"tasks\[0\]\.streaming: .*classification"):
        load_task_data(_task(root, head="classification"), 0, 0)


def test_summary_counts_skipped_rows_per_task(tmp_path: Path, tokenizer: Any) -> None:
    """summary.json's data_errors: a streamed task's count comes from its reader, a sharded
    source read whole from its load; tasks that raise on bad rows are not listed."""
    from types import SimpleNamespace

    from bitblend.data.stream_loader import data_errors

    data = _bad(tmp_path, "b.jsonl", NOT_JSON)
    streamed = load_task_data(_task(data, data_errors="skip", shuffle_buffer=0), 0, 0)
    sampler = _sampler(streamed.stream, tokenizer, 6, 0)
    for _ in range(5):  # 30 rows: past shard b's bad line 2
        sampler.next()
    whole = load_task_data(_task(data, streaming=False, data_errors="skip"), 0, 0)
    tasks = [
        SimpleNamespace(cfg=_task(data, name="s", data_errors="skip"), data=streamed,
                        sampler=sampler),
        SimpleNamespace(cfg=_task(data, name="w", data_errors="skip"), data=whole, sampler=None),
        SimpleNamespace(cfg=_task(data, name="r"), data=whole, sampler=None),
    ]  # fmt: skip
    out = data_errors(tasks)
    sampler.close()
    assert sorted(out) == ["s", "w"]
    assert out["s"]["skipped"] == out["w"]["skipped"] == 1
    assert "b.jsonl: line 2: invalid JSON" in out["s"]["first"] == out["w"]["first"]
