"""Probabilities from raw outputs, the calibration metrics, and temperature scaling.

Everything works on class-probability matrices p (n, C) in float64; a binary head's
single logit z becomes the two columns [1 - sigmoid(z), sigmoid(z)], so one code path
serves both heads. Metrics: accuracy, macro-F1, NLL (mean -log p[gold]), ECE (top-label,
15 equal-width confidence bins, Guo et al. 2017) and Brier (mean squared distance between
p and the one-hot gold vector, summed over classes). Macro-F1 is tasks/metrics.py's one
definition (classes present in gold or predictions).

It lives under tasks/ (not ensemble/) because the ensemble-spec backend in runs/ needs it to
answer predictions, and ensemble/, merge and distill sit above runs/.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitblend.numeric import sigmoid, softmax
from bitblend.tasks.metrics import macro_f1

EPS = 1e-12
ECE_BINS = 15


def to_probs(head: str, outputs: np.ndarray) -> np.ndarray:
    """Raw outputs (n, C) logits or (n, 1) binary logit -> probabilities (n, C)."""
    if head == "binary":
        p1 = sigmoid(outputs[:, 0])
        return np.stack([1.0 - p1, p1], axis=1)
    return softmax(outputs, axis=1)


def to_outputs(head: str, probs: np.ndarray) -> np.ndarray:
    """Probabilities (n, C) -> raw outputs whose softmax (sigmoid) gives them back."""
    logp = np.log(np.clip(probs, EPS, None))
    if head == "binary":
        return (logp[:, 1] - logp[:, 0])[:, None].astype(np.float32)
    return logp.astype(np.float32)


def log_probs(probs: np.ndarray) -> np.ndarray:
    """log p, clipped away from log(0)."""
    return np.log(np.clip(probs, EPS, None))


def scale(logp: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): probabilities at temperature T (T > 1 softens)."""
    return softmax(logp / temperature, axis=1)


def nll(p: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the gold classes."""
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], EPS, None))))


def ece(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top label over equal-width confidence bins."""
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # Bin k holds confidences in (k/bins, (k+1)/bins]; a confidence of 0 joins bin 0.
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for k in range(bins):
        m = which == k
        if m.any():
            total += m.sum() * abs(correct[m].mean() - conf[m].mean())
    return float(total / max(len(y), 1))


def brier(p: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score: mean over examples of sum_c (p_c - [y == c])^2."""
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """accuracy, macro_f1, nll, ece, brier of probabilities p (n, C) against class ids y."""
    pred = p.argmax(axis=1)
    return {
        "accuracy": float((pred == y).mean()),
        "macro_f1": macro_f1(pred, y),
        "nll": nll(p, y),
        "ece": ece(p, y),
        "brier": brier(p, y),
    }


class Temperature:
    """Temperature scaling (one scalar T): fit on validation data, apply anywhere."""

    def __init__(self, value: float = 1.0) -> None:
        self.value = float(value)

    def fit(self, logp: np.ndarray, y: np.ndarray) -> Temperature:
        """Choose T in [0.05, 20] minimising the NLL of softmax(log p / T) on (logp, y)."""
        # scipy.optimize takes about a second to import; only fitting a temperature needs it.
        from scipy.optimize import minimize_scalar

        # NLL is smooth and, in log T, close to convex: a bounded scalar search suffices.
        res = minimize_scalar(
            lambda t: nll(scale(logp, float(np.exp(t))), y),
            bounds=(np.log(0.05), np.log(20.0)),
            method="bounded",
            options={"xatol": 1e-4},
        )
        self.value = float(np.exp(res.x))
        return self

    def apply(self, logp: np.ndarray) -> np.ndarray:
        """Calibrated probabilities softmax(log p / T)."""
        return scale(logp, self.value)

    def state_dict(self) -> dict[str, Any]:
        """{'temperature': T}."""
        return {"temperature": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.value = float(state["temperature"])
