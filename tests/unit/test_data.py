"""Data: sources, label maps, seeded splits, the resumable batch sampler, collate, mixing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from bitblend.config.schema import TaskConfig
from bitblend.data.modalities import EncodedSplit, collate, encode_split
from bitblend.data.sampler import BatchSampler
from bitblend.data.sources import TaskData, load_task_data, read_inputs
from bitblend.errors import BitblendError


def task(data: Path | str, **kw: Any) -> TaskConfig:
    """A task over `data` (a path or a built-in name)."""
    return TaskConfig(name="t", data=str(data), **kw)


def write(df: pd.DataFrame, path: Path) -> Path:
    """Write `df` in the format its suffix names."""
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        raise AssertionError(path)
    return path


def numbered(n: int, labels: list[Any]) -> pd.DataFrame:
    """n rows of unique texts `text i`, labels cycling through `labels`."""
    return pd.DataFrame(
        {
            "text": [f"text {i}" for i in range(n)],
            "label": [labels[i % len(labels)] for i in range(n)],
        }
    )


# The shape of TaskData is known to these three helpers only.
def texts(data: TaskData, split: str) -> list[str]:
    """Input texts of one split ("train" or "eval")."""
    return list(getattr(data, split).text)


def targets(data: TaskData, split: str) -> list[Any]:
    """Mapped targets of one split: class ids or float values."""
    return list(np.asarray(getattr(data, f"{split}_targets")).tolist())


def pairs(data: TaskData, split: str) -> list[tuple[str, Any]]:
    """(text, label name or value) of one split, mapped back through label_names."""
    xs, ys = texts(data, split), targets(data, split)
    if data.label_names:
        return [(t, data.label_names[y]) for t, y in zip(xs, ys, strict=True)]
    return list(zip(xs, ys, strict=True))


# -- sources -------------------------------------------------------------------------------


def test_bbc_news_has_2225_examples_and_5_topics() -> None:
    data = load_task_data(task("bbc_news"), 0, seed=0)
    assert len(texts(data, "train")) + len(texts(data, "eval")) == 2225
    assert len(data.label_names) == 5
    assert data.label_names == sorted(data.label_names)
    assert {"business", "politics", "tech"} <= set(data.label_names)
    assert set(targets(data, "train")) == set(range(5))
    assert all(isinstance(t, str) and t.strip() for t in texts(data, "train")[:50])
    assert data.source == "bbc_news"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_user_files_load_with_configured_columns(tmp_path: Path, suffix: str) -> None:
    n = 40
    df = pd.DataFrame(
        {
            "review": [f"review number {i}" for i in range(n)],
            "stars": [["bad", "good", "meh"][i % 3] for i in range(n)],
            "extra": list(range(n)),
        }
    )
    path = write(df, tmp_path / f"reviews{suffix}")
    data = load_task_data(task(path, text_column="review", label_column="stars"), 0, seed=0)
    truth = dict(zip(df["review"], df["stars"], strict=True))
    got = pairs(data, "train") + pairs(data, "eval")
    assert len(got) == n
    assert all(truth[t] == y for t, y in got)
    assert data.label_names == ["bad", "good", "meh"]
    assert data.source == str(path.resolve())


def test_regression_targets_are_floats(tmp_path: Path) -> None:
    df = pd.DataFrame({"text": [f"t{i}" for i in range(20)], "label": [i * 0.5 for i in range(20)]})
    data = load_task_data(task(write(df, tmp_path / "r.csv"), head="regression"), 0, seed=0)
    assert data.label_names == []
    truth = dict(zip(df["text"], df["label"], strict=True))
    for t, y in pairs(data, "train") + pairs(data, "eval"):
        assert isinstance(y, float) and y == truth[t]


def test_separate_eval_file(tmp_path: Path) -> None:
    train = write(numbered(20, ["a", "b"]), tmp_path / "train.csv")
    ev = write(pd.DataFrame({"text": ["x", "y"], "label": ["b", "a"]}), tmp_path / "eval.jsonl")
    data = load_task_data(task(train, eval_data=str(ev)), 0, seed=0)
    assert len(texts(data, "train")) == 20  # nothing held out of `data`
    assert pairs(data, "eval") == [("x", "b"), ("y", "a")]


def test_eval_label_unseen_in_training_is_an_error(tmp_path: Path) -> None:
    train = write(numbered(20, ["a", "b"]), tmp_path / "train.csv")
    ev = write(
        pd.DataFrame({"text": ["x", "y", "z"], "label": ["a", "b", "c"]}), tmp_path / "e.csv"
    )
    with pytest.raises(BitblendError, match=r"e\.csv: row 3: label 'c' does not occur"):
        load_task_data(task(train, eval_data=str(ev)), 0, seed=0)


def test_read_inputs_for_predict(tmp_path: Path) -> None:
    path = write(pd.DataFrame({"body": ["one", "two"]}), tmp_path / "in.jsonl")
    assert read_inputs(path, task(path, text_column="body")).text == ["one", "two"]
    with pytest.raises(BitblendError, match=r"in\.jsonl: .*'text'"):
        read_inputs(path, task(path))


# -- label maps ----------------------------------------------------------------------------


def test_label_map_is_sorted_alphabetically(tmp_path: Path) -> None:
    path = write(numbered(30, ["zebra", "apple", "mango"]), tmp_path / "l.csv")
    data = load_task_data(task(path), 0, seed=0)
    assert data.label_names == ["apple", "mango", "zebra"]


def test_numeric_labels_sort_numerically(tmp_path: Path) -> None:
    # As strings "10" < "2"; as numbers 2 < 10, so class ids stay 1 -> 0, 2 -> 1, 10 -> 2.
    path = write(numbered(30, [10, 2, 1]), tmp_path / "n.csv")
    data = load_task_data(task(path), 0, seed=0)
    assert data.label_names == ["1", "2", "10"]
    truth = dict(zip(*[numbered(30, [10, 2, 1])[c] for c in ("text", "label")], strict=True))
    for t, y in zip(texts(data, "train"), targets(data, "train"), strict=True):
        assert int(data.label_names[y]) == truth[t]


def test_a_single_class_is_an_error(tmp_path: Path) -> None:
    path = write(numbered(10, ["only"]), tmp_path / "one.csv")
    with pytest.raises(BitblendError, match="has 1 distinct label"):
        load_task_data(task(path), 0, seed=0)


# -- splits --------------------------------------------------------------------------------


def test_split_is_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    path = write(numbered(100, ["a", "b", "c"]), tmp_path / "s.csv")
    one = load_task_data(task(path, eval_fraction=0.2), 0, seed=0)
    again = load_task_data(task(path, eval_fraction=0.2), 0, seed=0)
    other = load_task_data(task(path, eval_fraction=0.2), 0, seed=1)
    assert len(texts(one, "eval")) == 20 and len(texts(one, "train")) == 80
    assert set(texts(one, "train")).isdisjoint(texts(one, "eval"))
    assert set(texts(one, "train")) | set(texts(one, "eval")) == {f"text {i}" for i in range(100)}
    assert texts(one, "eval") == texts(again, "eval") and texts(one, "train") == texts(
        again, "train"
    )
    assert targets(one, "train") == targets(again, "train")
    assert set(texts(other, "eval")) != set(texts(one, "eval"))


def test_split_keeps_at_least_one_eval_example(tmp_path: Path) -> None:
    path = write(numbered(10, ["a", "b"]), tmp_path / "s.csv")
    data = load_task_data(task(path, eval_fraction=0.01), 0, seed=0)
    assert len(texts(data, "eval")) == 1 and len(texts(data, "train")) == 9


def test_max_examples_subsamples_training_only(tmp_path: Path) -> None:
    path = write(numbered(100, ["a", "b"]), tmp_path / "m.csv")
    full = load_task_data(task(path), 0, seed=3)
    cut = load_task_data(task(path, max_examples=25), 0, seed=3)
    cut_again = load_task_data(task(path, max_examples=25), 0, seed=3)
    assert len(texts(cut, "train")) == 25
    assert len(set(texts(cut, "train"))) == 25
    assert set(texts(cut, "train")) <= set(texts(full, "train"))
    assert texts(cut, "eval") == texts(
        full, "eval"
    )  # the eval split does not depend on max_examples
    assert texts(cut, "train") == texts(cut_again, "train")
    bigger = load_task_data(task(path, max_examples=1000), 0, seed=3)
    assert texts(bigger, "train") == texts(full, "train")


# -- row-level errors ----------------------------------------------------------------------


def test_regression_error_names_the_file_row(tmp_path: Path) -> None:
    # Only data row 7 is bad. The row number must be that of the file, not the position
    # of the example after the seeded shuffle into train/eval.
    df = pd.DataFrame(
        {"text": [f"t{i}" for i in range(1, 21)], "label": [f"{i}.5" for i in range(1, 21)]}
    )
    df.loc[6, "label"] = "seven"
    path = write(df, tmp_path / "reg.csv")
    for seed in range(3):
        with pytest.raises(BitblendError) as info:
            load_task_data(task(path, head="regression"), 0, seed=seed)
        assert "reg.csv: row 7: label 'seven' is not a number" in str(info.value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("text,label\nhi,a\nyo,\nzz,b\n", r"row 2: column 'label' is empty"),
        ("text,label\nhi,1\nyo,\nzz,2\n", r"row 2: column 'label' is empty"),
        ("text,label\nhi,a\n,b\nzz,a\n", r"row 2: column 'text' is empty or not text"),
        ("txt,label\nhi,a\n", r"column 'text' not found \(columns: txt, label\); set tasks\[0\]"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(BitblendError, match=rf"bad\.csv: {expected}"):
        load_task_data(task(path), 0, seed=0)


def test_missing_file_and_unsupported_extension(tmp_path: Path) -> None:
    with pytest.raises(BitblendError, match=r"tasks\[2\]\.data: .*nope\.csv: file not found"):
        load_task_data(task(tmp_path / "nope.csv"), 2, seed=0)
    (tmp_path / "a.txt").write_text("hi\n")
    with pytest.raises(BitblendError, match=r"a\.txt: expected a \.csv, \.jsonl"):
        load_task_data(task(tmp_path / "a.txt"), 0, seed=0)


def test_malformed_jsonl_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b",\n')
    with pytest.raises(BitblendError, match=r"h\.jsonl: line 2: invalid JSON") as info:
        load_task_data(task(path), 0, seed=0)
    assert "\n" not in str(info.value).strip()


# -- batch sampler -------------------------------------------------------------------------


def lengths(n: int, seed: int = 0) -> np.ndarray:
    """Token counts between 4 and 128, like a text dataset."""
    return np.random.default_rng(seed).integers(4, 129, size=n)


def take(sampler: BatchSampler, k: int) -> list[list[int]]:
    return [sampler.next().tolist() for _ in range(k)]


@pytest.mark.parametrize("group", [True, False])
def test_no_example_repeats_within_an_epoch(group: bool) -> None:
    n, bs = 1003, 10  # 100 full batches, 3 examples left over each epoch
    s = BatchSampler(lengths(n), bs, seed=0, stream=0, group_by_length=group)
    assert s.batches_per_epoch == 100
    leftovers = []
    for _ in range(3):
        epoch = take(s, 100)
        flat = [i for b in epoch for i in b]
        assert all(len(b) == bs for b in epoch)
        assert len(flat) == len(set(flat)) == 1000
        assert all(0 <= i < n for i in flat)
        leftovers.append(frozenset(range(n)) - set(flat))
    assert s.epoch == 3 and s.cursor == 0
    assert len(set(leftovers)) > 1  # a different remainder is dropped each epoch


def test_sampler_is_deterministic_per_seed_and_stream() -> None:
    L = lengths(500)
    a = take(BatchSampler(L, 8, seed=1, stream=0), 80)
    assert a == take(BatchSampler(L, 8, seed=1, stream=0), 80)
    assert a != take(BatchSampler(L, 8, seed=2, stream=0), 80)
    assert a != take(BatchSampler(L, 8, seed=1, stream=1), 80)


@pytest.mark.parametrize("cut", [0, 13, 62, 63, 64, 100])
def test_state_dict_resumes_the_exact_sequence(cut: int) -> None:
    L = lengths(500)  # 62 batches of 8 per epoch: cuts around the epoch boundary too
    straight = take(BatchSampler(L, 8, seed=4, stream=2), 140)
    first = BatchSampler(L, 8, seed=4, stream=2)
    take(first, cut)
    state = first.state_dict()
    resumed = BatchSampler(L, 8, seed=4, stream=2)
    resumed.load_state_dict(dict(state))
    assert take(resumed, 140 - cut) == straight[cut:]


def test_load_state_dict_into_a_used_sampler() -> None:
    # A sampler that has already produced batches (its epoch is cached) must follow the
    # loaded state, seed included, exactly like a fresh one.
    L = lengths(300)
    target = BatchSampler(L, 4, seed=1, stream=0)
    take(target, 5)
    state = target.state_dict()
    used = BatchSampler(L, 4, seed=0, stream=0)
    take(used, 2)
    used.load_state_dict(state)
    assert take(used, 10) == take(target, 10)


def padding(batches: list[list[int]], L: np.ndarray) -> int:
    return sum(int(L[b].max()) * len(b) - int(L[b].sum()) for b in batches)


def test_length_grouping_reduces_padding() -> None:
    L = lengths(2000)
    grouped = BatchSampler(L, 16, seed=0, stream=0, group_by_length=True)
    plain = BatchSampler(L, 16, seed=0, stream=0, group_by_length=False)
    n = grouped.batches_per_epoch
    g, p = padding(take(grouped, n), L), padding(take(plain, n), L)
    assert g < 0.25 * p, (g, p)


def test_grouped_batches_still_shuffle_across_the_epoch() -> None:
    L = lengths(2000)
    s = BatchSampler(L, 16, seed=0, stream=0, group_by_length=True)
    longest = [int(L[b].max()) for b in take(s, s.batches_per_epoch)]
    assert longest != sorted(longest, reverse=True)  # not simply longest-first


def test_too_few_examples_for_one_batch() -> None:
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchSampler(lengths(5), 8, seed=0, stream=0)


# -- collate -------------------------------------------------------------------------------


def split_of(
    rows: list[list[int]], targets: list[Any], head: str = "classification"
) -> EncodedSplit:
    dtype = np.float32 if head == "regression" else np.int64
    lens = np.array([len(r) for r in rows], dtype=np.int64)
    return EncodedSplit(head=head, targets=np.array(targets, dtype=dtype), lengths=lens, ids=rows)


@pytest.mark.parametrize(("multiple", "seq"), [(1, 9), (8, 16), (4, 12), (16, 16)])
def test_collate_pads_to_a_multiple_and_masks(multiple: int, seq: int) -> None:
    rows = [[5, 6, 7], [1] * 9, [2, 3, 4, 5, 6], [9]]
    split = split_of(rows, [0, 1, 2, 1])
    batch = collate(split, [2, 0, 1], pad_id=0, multiple=multiple)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (3, seq)
    assert ids.dtype == mask.dtype == torch.long
    for j, i in enumerate([2, 0, 1]):
        n = len(rows[i])
        assert ids[j, :n].tolist() == rows[i]
        assert mask[j, :n].tolist() == [1] * n
        assert mask[j, n:].sum() == 0
        assert (ids[j, n:] == 0).all()
    assert batch["labels"].tolist() == [2, 0, 1]
    assert batch["labels"].dtype == torch.long


def test_collate_uses_the_pad_id_and_float_regression_labels() -> None:
    split = split_of([[5, 6], [7]], [0.5, -1.25], head="regression")
    batch = collate(split, np.array([1, 0]), pad_id=99, multiple=4)
    assert batch["input_ids"].tolist() == [[7, 99, 99, 99], [5, 6, 99, 99]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [-1.25, 0.5]


def test_encode_split_truncates_and_records_lengths() -> None:
    from bitblend.data.table import Table
    from bitblend.models.backbones import load_backbone

    _, tokenizer = load_backbone("tiny-gpt")
    texts = ["short", "a much longer text " * 10, "x"]
    targets = np.array([0, 1, 0])
    split = encode_split(
        Table(labels=[0, 1, 0], text=texts),
        "classification",
        targets,
        tokenizer=tokenizer,
        max_length=16,
    )
    assert len(split) == 3
    assert split.ids is not None
    assert split.lengths.tolist() == [len(r) for r in split.ids]
    assert max(split.lengths) == 16
    assert split.lengths[0] < 16
    assert split.ids[0] == tokenizer("short")["input_ids"]
