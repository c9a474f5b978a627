"""Eval metrics per head kind.

Macro-F1 has one definition here (`macro_f1`), used by eval, training's eval rows and the
ensemble/merge reports: the unweighted mean of per-class F1 over the classes that occur in
the gold labels or in the predictions (scikit-learn's default label set). A class that is
neither present nor predicted has no F1 to average, so a small eval split missing a class
is not penalised for it; a class predicted but never present counts with F1 = 0.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score


def macro_f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """Mean per-class F1 over the classes present in `gold` or `pred` (0.0 when none).

    Class ids (n,) or indicator matrices (n, L) for multilabel; per class F1 is
    2 tp / (2 tp + fp + fn), and a class with 2 tp + fp + fn = 0 occurs nowhere.
    """
    p, g = np.asarray(pred), np.asarray(gold)
    if p.ndim == 1:
        classes = np.union1d(np.unique(p), np.unique(g))
        p = p[:, None] == classes[None, :]
        g = g[:, None] == classes[None, :]
    p, g = p.astype(bool), g.astype(bool)
    tp = (p & g).sum(axis=0).astype(np.float64)
    denom = 2 * tp + (p & ~g).sum(axis=0) + (~p & g).sum(axis=0)
    present = denom > 0
    if not present.any():
        return 0.0
    return float(np.mean(2 * tp[present] / denom[present]))


def classification_metrics(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-averaged F1 of predicted class ids."""
    return {
        "accuracy": float((pred == gold).mean()),
        "macro_f1": macro_f1(pred, gold),
    }


def binary_metrics(logit: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Accuracy, F1 of the positive class, and ROC AUC (when both classes occur)."""
    pred = (logit > 0).astype(np.int64)
    g = gold.astype(np.int64)
    out = {
        "accuracy": float((pred == g).mean()),
        "f1": float(f1_score(g, pred, zero_division=0)),
    }
    if 0 < g.sum() < len(g):
        out["auc"] = float(roc_auc_score(g, logit))
    return out


def multilabel_metrics(logits: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Micro and macro F1 over labels, and exact-match (subset) accuracy."""
    pred = (logits > 0).astype(np.int64)
    g = gold.astype(np.int64)
    return {
        "micro_f1": float(f1_score(g, pred, average="micro", zero_division=0)),
        "macro_f1": macro_f1(pred, g),
        "exact_match": float((pred == g).all(axis=1).mean()),
    }


def regression_metrics(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Mean squared and mean absolute error."""
    err = pred.astype(np.float64) - gold.astype(np.float64)
    return {"mse": float((err**2).mean()), "mae": float(np.abs(err).mean())}


def token_metrics(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Token accuracy and macro-F1 over labelled tokens (flattened)."""
    return {
        "token_accuracy": float((pred == gold).mean()) if len(gold) else 0.0,
        "macro_f1": macro_f1(pred, gold),
    }


def lm_metrics(loss: float) -> dict[str, float]:
    """Perplexity from the mean token cross-entropy."""
    return {"perplexity": float(math.exp(min(loss, 50.0)))}
