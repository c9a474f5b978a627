"""The one numpy definition of softmax, log-softmax and sigmoid (float64, overflow-safe).

Reported probabilities, ensemble combiners, calibration and synthetic data all use these;
torch code keeps torch's own ops.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def log_softmax(z: Any, axis: int = -1) -> np.ndarray:
    """log softmax(z) along `axis`, in float64 (max-shifted: exp never overflows)."""
    z = np.asarray(z, dtype=np.float64)
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def softmax(z: Any, axis: int = -1) -> np.ndarray:
    """softmax(z) along `axis` in float64; rows sum to 1."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(z: Any) -> np.ndarray:
    """1 / (1 + exp(-z)) in float64, elementwise, without overflow warnings for large |z|."""
    z = np.asarray(z, dtype=np.float64)
    # exp of a non-positive number only: exp(-|z|) in (0, 1].
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
