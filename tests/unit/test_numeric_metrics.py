"""One softmax/sigmoid (bitblend/numeric.py) and one macro-F1 (tasks/metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from bitblend.numeric import log_softmax, sigmoid, softmax
from bitblend.tasks import calibration as cal
from bitblend.tasks import metrics as M


def test_softmax_and_sigmoid_match_torch_and_never_overflow() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(scale=30.0, size=(64, 7))
    ref = torch.softmax(torch.from_numpy(z), dim=1).numpy()
    np.testing.assert_allclose(softmax(z, axis=1), ref, rtol=1e-12, atol=1e-15)
    ref_log = torch.log_softmax(torch.from_numpy(z), dim=1).numpy()
    np.testing.assert_allclose(log_softmax(z, axis=1), ref_log, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigmoid(z), torch.sigmoid(torch.from_numpy(z)).numpy(), rtol=1e-12)
    with np.errstate(over="raise", invalid="raise"):  # no exp overflow anywhere
        big = np.array([[-1000.0, 0.0, 1000.0]])
        assert softmax(big, axis=1)[0].tolist() == [0.0, 0.0, 1.0]
        assert sigmoid(big)[0].tolist() == [0.0, 0.5, 1.0]


def test_macro_f1_is_sklearns_default_over_present_labels() -> None:
    """Class ids: the mean F1 over classes in gold or predictions (sklearn's default set)."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        gold = rng.integers(0, 6, size=40)
        pred = rng.integers(0, 6, size=40)
        ref = f1_score(gold, pred, average="macro", zero_division=0)
        assert M.macro_f1(pred, gold) == pytest.approx(ref, abs=1e-12)


def test_macro_f1_multilabel_averages_present_columns() -> None:
    rng = np.random.default_rng(2)
    gold = rng.integers(0, 2, size=(30, 5))
    pred = rng.integers(0, 2, size=(30, 5))
    gold[:, 4] = pred[:, 4] = 0  # a label nobody has nor predicts: not averaged
    ref = f1_score(gold[:, :4], pred[:, :4], average="macro", zero_division=0)
    assert M.macro_f1(pred, gold) == pytest.approx(ref, abs=1e-12)


def test_eval_and_ensemble_reports_agree_on_macro_f1() -> None:
    """The same predictions get the same macro-F1 from eval (class ids) and from the
    ensemble/calibration report (probabilities over all C classes), also when a class of
    the label space is absent from this split: it is neither gold nor predicted, so it is
    not averaged (the report used to count it as F1 = 0)."""
    gold = np.array([0, 0, 1, 1, 1, 0])
    probs = np.zeros((6, 3))  # class 2 exists in the label space, never occurs here
    probs[np.arange(6), [0, 1, 1, 1, 0, 0]] = 0.8
    probs[:, 2] = 0.1
    probs /= probs.sum(axis=1, keepdims=True)
    pred = probs.argmax(axis=1)
    from_eval = M.classification_metrics(pred, gold)["macro_f1"]
    from_report = cal.metrics(probs, gold)["macro_f1"]
    assert from_eval == pytest.approx(from_report, abs=1e-12)
    assert from_eval == pytest.approx(2 / 3, abs=1e-12)  # F1 2/3 for both present classes


def test_macro_f1_of_nothing_is_zero() -> None:
    assert M.macro_f1(np.array([], dtype=np.int64), np.array([], dtype=np.int64)) == 0.0
