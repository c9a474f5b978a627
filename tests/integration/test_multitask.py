"""Data-level mixing: every head type trains, modalities combine, missing ones are masked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bitblend.config.load import apply_overrides, recipe_from_dict
from bitblend.train.trainer import Trainer

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def _recipe(tasks: list[dict], backbone: str = "tiny-bert", **train: object) -> dict:
    return {
        "name": "mt",
        "model": {"backbone": backbone, "max_length": 32, "dropout": 0.0},
        "tasks": tasks,
        "precision": {"recipe": "32-true"},
        "optimizer": {"lr": 3e-3},
        "schedule": {"name": "constant"},
        "train": {"steps": 30, "batch_size": 16, "eval_max_examples": 64, **train},
    }


def _run(data: dict, path: Path, *overrides: str) -> tuple[Trainer, list[dict]]:
    recipe = recipe_from_dict(apply_overrides(data, list(overrides)))
    trainer = Trainer(recipe, path, show_progress=False)
    trainer.fit()
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return trainer, rows


def _falls(rows: list[dict], task: str) -> bool:
    losses = [r["task_loss"][task] if "task_loss" in r else r["loss"] for r in rows
              if r["split"] == "train" and task in r["task"].split("+")]  # fmt: skip
    k = max(2, len(losses) // 4)
    return float(np.mean(losses[-k:])) < float(np.mean(losses[:k]))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small learnable datasets for each head kind, written as real files."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=8)) for _ in range(240)]
    has = lambda w: np.array([w in t.split() for t in texts])  # noqa: E731
    pd.DataFrame({"text": texts, "label": np.where(has("alpha"), "yes", "no")}).to_csv(
        d / "binary.csv", index=False
    )
    multi = [
        "|".join(w for w in ("alpha", "beta", "gamma") if w in t.split()) or "none" for t in texts
    ]
    pd.DataFrame({"text": texts, "tags": multi}).to_csv(d / "multi.csv", index=False)
    score = [float(t.split().count("omega")) for t in texts]
    pd.DataFrame({"text": texts, "score": score}).to_csv(d / "reg.csv", index=False)
    with (d / "tokens.jsonl").open("w") as fh:
        for t in texts:
            words = t.split()
            tags = ["G" if w.startswith(("g", "s")) else "O" for w in words]
            fh.write(json.dumps({"words": words, "tags": tags}) + "\n")
    # Tabular + image + text in one example; a third of the images and some features missing.
    n = 240
    x = rng.normal(size=(n, 4)).astype(np.float32)
    img = rng.random((n, 4, 4, 1)).astype(np.float32)
    y = (x[:, 0] + img[:, :2, :2, 0].mean(axis=(1, 2)) * 3 > 1.5).astype(int)
    np.save(d / "img.npy", img)
    feats = pd.DataFrame(x, columns=["f0", "f1", "f2", "f3"])
    feats.loc[::7, "f2"] = np.nan
    feats["label"] = np.where(y == 1, "pos", "neg")
    feats.to_csv(d / "tab.csv", index=False)
    return {k: d / f for k, f in [("binary", "binary.csv"), ("multi", "multi.csv"),
            ("reg", "reg.csv"), ("tokens", "tokens.jsonl"), ("tab", "tab.csv")]}  # fmt: skip


@pytest.mark.slow
def test_every_pooled_head_trains_together(files: dict[str, Path], tmp_path: Path) -> None:
    """binary (BCE), multilabel (BCE), regression (MSE), tabular classification (CE): one
    trunk, mixed batches, each task's loss falls."""
    tasks = [
        {"name": "bin", "data": str(files["binary"]), "head": "binary"},
        {
            "name": "multi",
            "data": str(files["multi"]),
            "head": "multilabel",
            "label_column": "tags",
        },
        {"name": "reg", "data": str(files["reg"]), "head": "regression", "label_column": "score"},
        {"name": "tab", "data": str(files["tab"]), "modality": "tabular"},
    ]
    trainer, rows = _run(_recipe(tasks, steps=40), tmp_path / "r", "mixing.batches=mixed",
                         "mixing.strategy=uniform")  # fmt: skip
    for name in ("bin", "multi", "reg", "tab"):
        assert _falls(rows, name), name
    ev = json.loads((tmp_path / "r" / "eval.json").read_text())["tasks"]
    assert {"accuracy", "f1"} <= ev["bin"].keys() and "micro_f1" in ev["multi"]
    assert "mse" in ev["reg"] and "accuracy" in ev["tab"]
    assert trainer.model.specs["multi"].label_names == ["alpha", "beta", "gamma", "none"]


@pytest.mark.slow
def test_token_classification_trains(files: dict[str, Path], tmp_path: Path) -> None:
    tasks = [{"name": "tok", "data": str(files["tokens"]), "head": "token_classification",
              "text_column": "words", "label_column": "tags"}]  # fmt: skip
    _, rows = _run(_recipe(tasks), tmp_path / "r")
    assert _falls(rows, "tok")
    ev = json.loads((tmp_path / "r" / "eval.json").read_text())["tasks"]["tok"]
    assert ev["token_accuracy"] > 0.5


@pytest.mark.slow
def test_masked_and_causal_lm_train(tmp_path: Path) -> None:
    mlm = [{"name": "mlm", "data": "bbc_news", "head": "masked_lm", "max_examples": 128}]
    _, rows = _run(_recipe(mlm, steps=25), tmp_path / "mlm")
    assert _falls(rows, "mlm")
    clm = [{"name": "clm", "data": "bbc_news", "head": "causal_lm", "max_examples": 128}]
    _, rows = _run(_recipe(clm, backbone="tiny-gpt", steps=25), tmp_path / "clm")
    assert _falls(rows, "clm")
    ev = json.loads((tmp_path / "clm" / "eval.json").read_text())["tasks"]["clm"]
    assert 1.0 < ev["perplexity"] < 257  # better than uniform over the byte vocabulary


def test_causal_lm_on_encoder_is_refused(tmp_path: Path) -> None:
    from bitblend.errors import BitblendError

    bad = [{"name": "clm", "data": "bbc_news", "head": "causal_lm", "max_examples": 64}]
    with pytest.raises(BitblendError, match=r"tasks\[0\]\.head: causal_lm needs a decoder"):
        Trainer(recipe_from_dict(_recipe(bad)), tmp_path / "r", show_progress=False)
    assert not (tmp_path / "r").exists()


def test_missing_modalities_are_masked_not_zero_filled(files: dict[str, Path]) -> None:
    """Changing the values behind a mask changes nothing; unmasking them does."""
    from bitblend.data.modalities import collate
    from bitblend.taskspec import load_data
    from bitblend.train.setup import build_model, build_tasks

    data = _recipe([{"name": "tab", "data": str(files["tab"]), "modality": "tabular"}])
    recipe = recipe_from_dict(data)
    datas = load_data(recipe)
    assert np.isnan(datas[0].train.tabular).any()  # the file has missing f2 values
    model, tok, tts = build_model(recipe, datas)
    task = build_tasks(recipe, datas, model, tok, tts, torch.no_grad, torch.device("cpu"))[0]
    model.eval()
    missing = np.where(np.isnan(task.train.tabular[:, 2]))[0][:4]
    batch = collate(task.train, missing, 0, 8)
    assert (batch["tabular_mask"][:, 2] == 0).all()
    with torch.no_grad():
        base = model("tab", **batch)
        poked = dict(batch, tabular=batch["tabular"].clone())
        poked["tabular"][:, 2] = 123.0  # garbage behind the mask
        same = model("tab", **poked)
        unmasked = dict(poked, tabular_mask=torch.ones_like(batch["tabular_mask"]))
        differs = model("tab", **unmasked)
    torch.testing.assert_close(base, same)
    assert not torch.allclose(base, differs)
