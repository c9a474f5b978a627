"""Eval metrics per head kind."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score


def classification_metrics(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-averaged F1 of predicted class ids."""
    return {
        "accuracy": float((pred == gold).mean()),
        "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
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
        "macro_f1": float(f1_score(g, pred, average="macro", zero_division=0)),
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
        "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
    }


def lm_metrics(loss: float) -> dict[str, float]:
    """Perplexity from the mean token cross-entropy."""
    return {"perplexity": float(math.exp(min(loss, 50.0)))}
