"""Simple baselines beside each task: the kinds that get one, the kinds that say why not,
and that the run's own split is what they are fitted and scored on."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_digits

from bitblend.config.schema import TaskConfig
from bitblend.data.sources import load_task_data
from bitblend.report.console import baseline_cell, metrics_table
from bitblend.tasks.baselines import SplitInputs, fit_baseline, no_baseline_reason
from bitblend.train.baselines import audio_statistics, rows_digest, task_baseline


def _split(x: np.ndarray, y: np.ndarray, n: int, kind: str) -> tuple[SplitInputs, SplitInputs]:
    def part(s: slice) -> SplitInputs:
        return SplitInputs(targets=y[s], **{kind: x[s]})

    return part(slice(n, None)), part(slice(0, n))


def test_image_baseline_is_logistic_regression_on_pixels() -> None:
    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)[..., None]
    train, ev = _split(images, d.target, 300, "image")
    res = fit_baseline("classification", train, ev, seed=0)
    assert res["model"] == "logreg" and res["metric"] == "accuracy"
    assert res["value"] > 0.9  # logistic regression on 8x8 pixels
    assert (res["train_examples"], res["eval_examples"]) == (1497, 300)


def test_tabular_reports_both_models_and_picks_the_better() -> None:
    d = load_breast_cancer()
    train, ev = _split(d.data.astype(np.float32), d.target, 100, "tabular")
    res = fit_baseline("binary", train, ev, seed=0)
    assert set(res["candidates"]) == {"logreg", "hgb"}
    best = max(res["candidates"].values(), key=lambda m: m["accuracy"])
    assert res["value"] == best["accuracy"] and "auc" in res["metrics"]


def test_text_and_regression_baselines() -> None:
    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta"])
    texts = [" ".join(rng.choice(words, 6)) for _ in range(200)]
    y = np.array([int("alpha" in t.split()) for t in texts])
    res = fit_baseline(
        "classification",
        SplitInputs(targets=y[50:], text=texts[50:]),
        SplitInputs(targets=y[:50], text=texts[:50]),
    )
    assert res["model"] == "tfidf-logreg" and res["value"] >= 0.9
    x = rng.normal(size=(200, 3)).astype(np.float32)
    target = (x @ np.array([1.0, -2.0, 0.5])).astype(np.float32)
    res = fit_baseline("regression", *_split(x, target, 50, "tabular"))
    assert res["model"] == "ridge" and res["metric"] == "mse" and res["value"] < 0.05


def test_audio_baseline_is_logistic_regression_on_log_mel_statistics() -> None:
    """Tones of two pitches in noise, clips of varying length at another rate: the log-mel
    statistics separate them, and a split without any input column says so."""
    rng = np.random.default_rng(0)
    rate, clips, labels = 8000, [], []
    for i in range(120):
        label = i % 2
        t = np.arange(int(rate * rng.uniform(0.3, 0.5))) / rate
        tone = np.sin(2 * np.pi * (300 if label else 1200) * t)
        clips.append((tone + rng.normal(0, 0.5, t.shape)).astype(np.float32))
        labels.append(label)
    feats = audio_statistics(clips, rate, 16000, 0.5, 32)
    assert feats.shape == (120, 5 * 32) and np.isfinite(feats).all()
    y = np.array(labels)
    res = fit_baseline("classification", *_split(feats, y, 40, "audio"))
    assert res["model"] == "logreg" and res["value"] >= 0.95
    assert no_baseline_reason("classification", []) == "no input column this baseline reads"


@pytest.mark.parametrize(
    ("head", "mods", "words"),
    [
        ("token_classification", ["text"], "token_classification head"),
        ("causal_lm", ["text"], "causal_lm head"),
        ("multilabel", ["text"], "multilabel head"),
        ("classification", ["text", "tabular"], "text+tabular"),
    ],
)
def test_kind_without_baseline_says_so(head: str, mods: list[str], words: str) -> None:
    reason = no_baseline_reason(head, mods)
    assert reason is not None and words in reason
    split = SplitInputs(targets=np.zeros(4), text=["a b"] * 4)
    if mods == ["text", "tabular"]:
        split.tabular = np.zeros((4, 2), dtype=np.float32)
    res = fit_baseline(head, split, split)
    assert res == {"model": None, "reason": reason}
    # The table shows the reason, not a number.
    assert baseline_cell(res) == f"- ({reason})"


def test_console_table_has_a_baseline_column() -> None:
    table = metrics_table(
        "t",
        {"a": {"accuracy": 0.9}, "b": {"perplexity": 3.0}},
        {"a": {"model": "logreg", "metric": "accuracy", "value": 0.95},
         "b": {"model": None, "reason": "no simple baseline for a causal_lm head"}},
    )  # fmt: skip
    headers = [c.header for c in table.columns]
    assert headers[:3] == ["task", "accuracy", "baseline"]  # beside the metric it compares
    cells = list(table.columns[2].cells)
    assert cells == ["0.9500 (logreg)", "- (no simple baseline for a causal_lm head)"]


def test_baseline_uses_the_runs_split_rows() -> None:
    """The train/eval rows are the split of the run's seed (and another seed's differ)."""
    task = TaskConfig(name="bc", data="breast_cancer", head="binary")
    data = load_task_data(task, 0, seed=3)
    res = task_baseline("binary", data, limit=40, seed=3)
    assert res["train_examples"] == len(data.train) and res["eval_examples"] == 40
    assert res["train_rows_sha256"] == rows_digest(data.train)
    assert res["eval_rows_sha256"] == rows_digest(data.eval.take(np.arange(40)))
    # Row ids are source rows: train and eval are disjoint and cover the source.
    assert data.train.rows is not None and data.eval.rows is not None
    assert not set(data.train.rows) & set(data.eval.rows)
    assert len(data.train.rows) + len(data.eval.rows) == 569
    other = load_task_data(task, 0, seed=4)
    assert rows_digest(other.train) != res["train_rows_sha256"]
