"""HF `save_to_disk` directories: splits, ClassLabel names, features, and one-line errors."""

from __future__ import annotations

import math
from pathlib import Path

import datasets
import numpy as np
import pytest

from bitblend.config.schema import TaskConfig
from bitblend.data.hfdisk import load_hf_disk
from bitblend.data.sources import load_task_data
from bitblend.errors import BitblendError

SENTIMENT = datasets.ClassLabel(names=["neg", "pos"])


def _reviews(n: int, offset: int = 0) -> datasets.Dataset:
    feats = datasets.Features({"text": datasets.Value("string"), "label": SENTIMENT,
                               "stars": datasets.Value("float32")})  # fmt: skip
    rows = {"text": [f"review {i + offset}" for i in range(n)], "label": [i % 2 for i in range(n)],
            "stars": [float(i % 5) for i in range(n)]}  # fmt: skip
    return datasets.Dataset.from_dict(rows, features=feats)


def test_dataset_dict_splits_and_class_names(tmp_path: Path) -> None:
    path = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": _reviews(10), "validation": _reviews(4, 100), "test": _reviews(3, 200)}
    ).save_to_disk(str(path))
    src = load_hf_disk(path, "text", "label", None)
    assert len(src.train) == 10 and src.eval is not None and len(src.eval) == 4  # validation
    assert src.train.labels[:3] == ["neg", "pos", "neg"]  # ClassLabel ids -> names
    assert src.label_names == ["neg", "pos"] and src.train.modalities == ["text"]
    assert src.eval.text == [f"review {i}" for i in range(100, 104)]


def test_test_split_is_eval_without_validation_and_features_give_tabular(tmp_path: Path) -> None:
    path = tmp_path / "dd"
    datasets.DatasetDict({"train": _reviews(6), "test": _reviews(2, 50)}).save_to_disk(str(path))
    src = load_hf_disk(path, "text", "label", ["stars"])
    assert src.eval is not None and len(src.eval) == 2
    assert src.train.modalities == ["text", "tabular"] and src.feature_names == ["stars"]
    assert src.train.tabular is not None and src.train.tabular.shape == (6, 1)
    np.testing.assert_array_equal(src.train.tabular[:, 0], [0, 1, 2, 3, 4, 0])


def test_plain_dataset_multilabel_and_regression_labels(tmp_path: Path) -> None:
    # A list column of class labels: `List` since datasets 4, `Sequence` before (the floor).
    list_of = getattr(datasets, "List", None) or datasets.Sequence
    tags = list_of(datasets.ClassLabel(names=["a", "b", "c"]))
    ds = datasets.Dataset.from_dict(
        {"text": ["x", "y", "z"], "tags": [[0, 2], [], [1]], "score": [0.5, 1.0, None]},
        features=datasets.Features({"text": datasets.Value("string"), "tags": tags,
                                    "score": datasets.Value("float64")}),
    )  # fmt: skip
    ds.save_to_disk(str(tmp_path / "ds"))
    src = load_hf_disk(tmp_path / "ds", "text", "tags", None)
    assert src.eval is None and src.train.labels == [["a", "c"], [], ["b"]]
    assert src.label_names == ["a", "b", "c"]
    with pytest.raises(BitblendError, match=r"ds: row 3: column 'score' is empty"):
        load_hf_disk(tmp_path / "ds", "text", "score", None)
    ok = load_hf_disk(tmp_path / "ds", "text", "text", ["score"])  # NaN marks a missing feature
    assert ok.train.tabular is not None and math.isnan(float(ok.train.tabular[2, 0]))


def test_missing_columns_and_bad_directories_are_one_line_errors(tmp_path: Path) -> None:
    path = tmp_path / "dd"
    datasets.DatasetDict({"train": _reviews(4), "test": _reviews(2)}).save_to_disk(str(path))
    with pytest.raises(BitblendError) as err:
        load_hf_disk(path, "text", "sentiment", None)
    assert str(err.value) == (
        f"{path} [train]: column 'sentiment' not found (columns: text, label, stars); "
        "set label_column"
    )
    with pytest.raises(BitblendError, match=r"\[train\]: column 'price' not found"):
        load_hf_disk(path, "text", "label", ["price"])
    with pytest.raises(BitblendError, match=r"column 'body' not found .*set text_column"):
        load_hf_disk(path, "body", "label", None)
    assert load_hf_disk(path, "body", "label", ["stars"]).train.modalities == ["tabular"]
    datasets.Dataset.from_dict({"text": ["a"], "label": [0], "f": ["high"]}).save_to_disk(
        str(tmp_path / "bad")
    )
    with pytest.raises(BitblendError, match=r"bad: row 1: feature 'f' value 'high' is not a num"):
        load_hf_disk(tmp_path / "bad", "text", "label", ["f"])
    datasets.DatasetDict({"dev": _reviews(2)}).save_to_disk(str(tmp_path / "nodev"))
    with pytest.raises(BitblendError, match=r"nodev: DatasetDict without a 'train' split \(spl"):
        load_hf_disk(tmp_path / "nodev", "text", "label", None)
    (tmp_path / "junk").mkdir()
    with pytest.raises(BitblendError, match=r"junk: cannot load as a datasets directory"):
        load_hf_disk(tmp_path / "junk", "text", "label", None)


def test_a_task_reads_a_save_to_disk_directory(tmp_path: Path) -> None:
    path = tmp_path / "dd"
    datasets.DatasetDict({"train": _reviews(20), "test": _reviews(4, 40)}).save_to_disk(str(path))
    data = load_task_data(TaskConfig(name="rev", data=str(path)), 0, seed=0)
    assert len(data.train) == 20 and len(data.eval) == 4
    assert data.label_names == ["neg", "pos"] and data.train_targets.tolist()[:2] == [0, 1]
