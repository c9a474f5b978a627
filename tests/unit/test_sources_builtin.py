"""Built-in sources, image folders, HF save_to_disk dirs and the synthetic fraud set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bitblend.config.schema import TaskConfig
from bitblend.data.builtin import BUILTINS, load_builtin
from bitblend.data.fraud import generate_fraud
from bitblend.data.sources import load_task_data
from bitblend.errors import BitblendError


@pytest.mark.parametrize(
    ("name", "n", "eval_n", "modalities", "classes"),
    [
        ("bbc_news", 2225, None, ["text"], 5),
        ("election_tweets", 6444, None, ["text"], 2),
        ("reuters_r8", 5485, 2189, ["text"], 8),
        ("20newsgroups", 11293, 7528, ["text"], 20),
        ("chinese_reviews", 17361, None, ["text"], 2),
        ("digits", 1797, None, ["image"], 10),
        ("breast_cancer", 569, None, ["tabular"], 2),
    ],
)
def test_builtin_sizes_and_classes(name, n, eval_n, modalities, classes) -> None:
    src = load_builtin(name)
    assert len(src.train) == n
    assert (len(src.eval) if src.eval else None) == eval_n
    assert src.train.modalities == modalities
    assert len({str(y) for y in src.train.labels}) == classes


def test_every_builtin_is_registered_with_a_description() -> None:
    assert set(BUILTINS) >= {"bbc_news", "digits", "diabetes", "fraud", "20newsgroups"}
    assert all(spec.description for spec in BUILTINS.values())
    diabetes = load_builtin("diabetes")
    assert diabetes.train.tabular is not None and diabetes.train.tabular.shape == (442, 10)


def test_wordpiece_fixes_minilm_unk_rate_on_chinese() -> None:
    from transformers import AutoTokenizer

    from bitblend.data.wordpiece import train_wordpiece, unk_rate
    from bitblend.models.backbones import minilm_path

    texts = load_builtin("chinese_reviews").train.text
    assert texts is not None
    train, held = texts[::2][:4000], texts[1::2][:1000]
    minilm = unk_rate(AutoTokenizer.from_pretrained(minilm_path()), held)
    own = unk_rate(train_wordpiece(train, 8000), held)
    assert minilm > 0.5  # MiniLM's English vocabulary: most characters are [UNK]
    assert own < 0.05  # measured on texts the vocabulary was not trained on


def test_fraud_is_synthetic_deterministic_and_needs_every_modality() -> None:
    a, b = generate_fraud(600, seed=1), generate_fraud(600, seed=1)
    assert a.synthetic and "SYNTHETIC" in a.description
    assert a.train.text == b.train.text
    np.testing.assert_array_equal(a.train.tabular, b.train.tabular)
    assert a.train.modalities == ["text", "image", "tabular"]
    assert np.isnan(a.train.image).all(axis=(1, 2, 3)).mean() == pytest.approx(0.1, abs=0.04)
    y = np.array([label == "fraud" for label in a.train.labels])
    assert 0.05 < y.mean() < 0.35


def test_image_folder_and_errors_name_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            arr = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    task = TaskConfig(name="pets", data=str(tmp_path / "imgs"), patch_size=4)
    data = load_task_data(task, 0, seed=0)
    assert data.label_names == ["cat", "dog"]
    assert data.train.image is not None and data.train.image.shape[1:] == (8, 8, 3)
    Image.fromarray(np.zeros((9, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "dog" / "x.png")
    with pytest.raises(BitblendError, match=r"x\.png: image is 8x9, expected 8x8"):
        load_task_data(task, 0, seed=0)
    (tmp_path / "imgs" / "dog" / "x.png").write_bytes(b"not an image")
    with pytest.raises(BitblendError, match=r"x\.png: cannot decode image"):
        load_task_data(task, 0, seed=0)


def test_hf_save_to_disk_directory(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"text": ["a b", "c d"] * 10, "label": [0, 1] * 10}
            ),
            "test": datasets.Dataset.from_dict({"text": ["a", "d"], "label": [0, 1]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    data = load_task_data(TaskConfig(name="t", data=str(tmp_path / "ds")), 0, seed=0)
    assert len(data.train) == 20 and len(data.eval) == 2
    assert data.label_names == ["0", "1"]
