"""Eval metrics per head: accuracy and macro-F1; MSE and MAE."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score


def classification_metrics(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-averaged F1 of predicted class ids."""
    return {
        "accuracy": float((pred == gold).mean()),
        "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
    }


def regression_metrics(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Mean squared and mean absolute error."""
    err = pred.astype(np.float64) - gold.astype(np.float64)
    return {"mse": float((err**2).mean()), "mae": float(np.abs(err).mean())}
