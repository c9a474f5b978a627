"""train.head_refit: at the end of a run, image / tabular heads are refitted by logistic
regression on the final trunk's features of their training split (with a shortcut: on those
and the raw features, as one readout); the model that is evaluated, checkpointed and saved
holds exactly that readout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bitblend.config.load import recipe_from_dict
from bitblend.models.trunk import load_model
from bitblend.train.evaluate import predict_outputs
from bitblend.train.head_refit import choose_c, fit_readout, head_weights
from bitblend.train.trainer import Trainer


def _recipe(mode: str) -> dict:
    return {
        "name": "refit",
        "model": {"backbone": "tiny-bert", "max_length": 16},
        "tasks": [
            {"name": "digits", "data": "digits", "patch_size": 4, "max_examples": 400},
            {"name": "cancer", "data": "breast_cancer", "head": "binary", "shortcut": True},
            {"name": "bbc", "data": "bbc_news", "max_examples": 64},
        ],
        "precision": {"recipe": "32-true"},
        "train": {"steps": 3, "batch_size": 8, "eval_max_examples": 64, "baselines": "off",
                  "head_refit": mode},
    }  # fmt: skip


@pytest.mark.parametrize("k", [2, 3])
def test_the_head_weights_reproduce_logistic_regression(k: int) -> None:
    """Folding the standardisation back into the weights, and sklearn's single row for
    two classes into a two-logit softmax head, keeps every prediction."""
    rng = np.random.default_rng(k)
    x = rng.normal(size=(120, 6)).astype(np.float32) * rng.uniform(0.1, 5, 6) + 3
    y = (x @ rng.normal(size=(6, k))).argmax(axis=1)
    fit = fit_readout(x, y, seed=0)
    w, b = head_weights(fit, "classification", k)
    assert w.shape == (k, 6) and b.shape == (k,)
    from sklearn.linear_model import LogisticRegression

    z = (x - x.mean(0)) / x.std(0)
    lr = LogisticRegression(C=fit["C"], max_iter=1000).fit(z, y)
    assert np.array_equal((x @ w.T + b).argmax(axis=1), lr.predict(z))
    assert fit["train_accuracy"] == pytest.approx(lr.score(z, y))
    if k == 2:  # the binary head: one logit whose sign is the class
        w1, b1 = head_weights(fit, "binary", 1)
        assert np.array_equal((x @ w1.T + b1)[:, 0] > 0, lr.predict(z) == 1)


def test_the_one_standard_error_rule_takes_the_strongest_l2_the_folds_cannot_tell_apart() -> None:
    # C=1 has the best mean (.967); its standard error over 3 folds is .0033, so C=0.1
    # (.965, inside it) wins under 1se, and C=0.01 (.95, outside) does not.
    scores = {
        0.01: np.array([0.95, 0.96, 0.94]),
        0.1: np.array([0.97, 0.96, 0.965]),
        1.0: np.array([0.97, 0.97, 0.96]),
        10.0: np.array([0.96, 0.97, 0.96]),
    }
    assert choose_c(scores, "best") == 1.0
    assert choose_c(scores, "1se") == 0.1
    # Equal means and no spread: best takes the tie nearest C=1, 1se the smallest C.
    flat = {c: np.array([0.9, 0.9, 0.9]) for c in (0.01, 0.1, 1.0, 10.0)}
    assert choose_c(flat, "best") == 1.0
    assert choose_c(flat, "1se") == 0.01


@pytest.mark.slow
def test_a_run_refits_image_and_tabular_heads_and_saves_them(tmp_path: Path) -> None:
    trainer = Trainer(recipe_from_dict(_recipe("auto")), tmp_path / "run", show_progress=False)
    trainer.fit()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rec = summary["head_refit"]
    assert rec["bbc"] == {"skipped": "auto refits image / tabular / audio tasks only"}
    evals = json.loads((tmp_path / "run" / "eval.json").read_text())["tasks"]
    model, _, _ = load_model(tmp_path / "run" / "model")
    assert rec["digits"]["readout"] == "head" and rec["cancer"]["readout"] == "head + shortcut"
    for t in trainer.tasks[:2]:
        r = rec[t.name]
        assert r["C"] in (0.01, 0.1, 1.0, 10.0) and r["rows"] == len(t.train)
        # The trained model (head + shortcut for cancer) now predicts its training rows as
        # the one fitted readout does.
        out, _ = predict_outputs(trainer.model, t.name, t.train, t.batch)
        pred = out[:, 0] > 0 if t.name == "cancer" else out.argmax(axis=1)
        acc = float((pred == np.asarray(t.train.targets)).mean())
        assert acc == pytest.approx(r["train_accuracy_after"], abs=1.5 / len(t.train))
        # 3 steps of a random trunk: the trained head is near chance, the readout is not.
        assert r["train_accuracy_after"] > r["train_accuracy_before"] + 0.2
        assert evals[t.name]["accuracy"] != r["eval_before"]["accuracy"]
        saved = model.heads[t.name][-1].weight  # model/ holds the refitted head
        assert torch.equal(saved, trainer.model.heads[t.name][-1].weight.detach())
    short = trainer.model.shortcuts["cancer"]  # refitted with the head, its bias folded there
    assert short.weight.abs().sum() > 0 and torch.equal(short.bias, torch.zeros_like(short.bias))
    assert torch.equal(model.shortcuts["cancer"].weight, short.weight.detach())
