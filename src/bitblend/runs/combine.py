"""Combining members' class probabilities: mean, vote, weighted, product, stack.

Input everywhere: `probs` (M members, n examples, C classes), each member's rows summing to 1
and its columns already in the ensemble's label order. `fit` sees validation labels only;
`predict` never sees labels. `cross_fit` gives out-of-fold predictions on the validation
split, so that what is fitted after the combiner (the temperature) is fitted on predictions
the combiner made without having seen those labels.

Under runs/ because a saved ensemble spec (runs/spec.py) predicts through `Combiner`;
`bitblend ensemble` (ensemble/spec.py) fits it from above.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, StratifiedKFold

from bitblend.errors import BitblendError
from bitblend.numeric import sigmoid, softmax
from bitblend.tasks.calibration import EPS

METHODS = ("mean", "vote", "weighted", "product", "stack")
STACK_FLOOR = 1e-6  # stack features are log p clipped here: one member's -27 must not dominate


class Combiner:
    """One ensemble rule with its fitted parameters (weights or a meta-learner)."""

    def __init__(self, method: str, members: int, classes: int, meta_c: float = 1.0) -> None:
        if method not in METHODS:
            raise BitblendError(f"--method {method}: expected one of {', '.join(METHODS)}")
        self.method = method
        self.members = members
        self.classes = classes
        self.meta_c = meta_c  # inverse L2 strength of the stacking logistic regression
        self.weights = np.full(members, 1.0 / members)
        self.coef: np.ndarray | None = None  # stack: (K, M*C); K = 1 for two seen classes
        self.intercept: np.ndarray | None = None  # stack: (K,)
        self.seen: list[int] = []  # stack: the classes the meta-learner saw, in its order

    @property
    def trainable(self) -> bool:
        """Whether `fit` learns anything from labels."""
        return self.method in ("weighted", "product", "stack")

    # -- fit ---------------------------------------------------------------------------
    def fit(self, probs: np.ndarray, y: np.ndarray) -> Combiner:
        """Learn weights or the meta-learner from validation probabilities and labels."""
        self._check(probs)
        if self.method == "weighted":
            self.weights = _fit_weights(probs, y)
        elif self.method == "product":
            self.weights = _fit_product(probs, y)
        elif self.method == "stack":
            self._fit_stack(probs, y)
        return self

    def _fit_stack(self, probs: np.ndarray, y: np.ndarray) -> None:
        if len(np.unique(y)) < 2:
            raise BitblendError("stack: the validation split holds one class; give more data")
        lr = LogisticRegression(C=self.meta_c, max_iter=2000)
        lr.fit(stack_features(probs), y)
        self.coef, self.intercept = lr.coef_.astype(np.float64), lr.intercept_.astype(np.float64)
        self.seen = [int(c) for c in lr.classes_]

    def _check(self, probs: np.ndarray) -> None:
        if probs.ndim != 3 or probs.shape[0] != self.members or probs.shape[2] != self.classes:
            raise ValueError(f"expected ({self.members}, n, {self.classes}), got {probs.shape}")

    # -- predict -----------------------------------------------------------------------
    def predict(self, probs: np.ndarray) -> np.ndarray:
        """Ensemble probabilities (n, C) from members' probabilities (M, n, C)."""
        self._check(probs)
        if self.method in ("mean", "weighted"):
            return np.einsum("m,mnc->nc", self.weights, probs)
        if self.method == "product":
            return softmax(np.einsum("m,mnc->nc", self.weights, _log_floor(probs)))
        if self.method == "vote":
            # Votes plus the mean probability, over M + 1: the majority always wins (a vote
            # is worth more than any probability gap), ties go to the more confident
            # class, and the gold class never gets probability 0 (NLL stays finite).
            votes = np.zeros(probs.shape[1:])
            for m in range(self.members):
                votes[np.arange(probs.shape[1]), probs[m].argmax(axis=1)] += 1.0
            return (votes + probs.mean(axis=0)) / (self.members + 1)
        if self.coef is None or self.intercept is None:
            raise BitblendError("stack: the meta-learner is not fitted")
        z = stack_features(probs) @ self.coef.T + self.intercept
        if len(self.seen) == 2:  # scikit-learn's binary form: one logit for seen[1]
            p1 = sigmoid(z[:, 0])
            sub = np.stack([1.0 - p1, p1], axis=1)
        else:
            sub = softmax(z)
        out = np.full((probs.shape[1], self.classes), EPS)
        out[:, self.seen] = sub
        return out / out.sum(axis=1, keepdims=True)

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (what ensemble.json stores)."""
        state: dict[str, Any] = {
            "method": self.method,
            "members": self.members,
            "classes": self.classes,
            "weights": self.weights.tolist(),
        }
        if self.method == "stack":
            assert self.coef is not None and self.intercept is not None
            state["meta"] = {
                "kind": "logistic_regression",
                "features": "log_probs",
                "floor": STACK_FLOOR,
                "C": self.meta_c,
                "classes": self.seen,
                "coef": self.coef.tolist(),
                "intercept": self.intercept.tolist(),
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.weights = np.asarray(state["weights"], dtype=np.float64)
        meta = state.get("meta")
        if meta is not None:
            self.meta_c = float(meta["C"])
            self.seen = [int(c) for c in meta["classes"]]
            self.coef = np.asarray(meta["coef"], dtype=np.float64)
            self.intercept = np.asarray(meta["intercept"], dtype=np.float64)
            k = 1 if len(self.seen) == 2 else len(self.seen)
            if self.coef.shape != (k, self.members * self.classes):
                raise ValueError(f"meta coef shape {self.coef.shape}")

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Combiner:
        """A combiner rebuilt from `state_dict()` output."""
        meta_c = float(state.get("meta", {}).get("C", 1.0))
        c = cls(state["method"], int(state["members"]), int(state["classes"]), meta_c)
        c.load_state_dict(state)
        return c


def _log_floor(probs: np.ndarray) -> np.ndarray:
    """log p clipped at STACK_FLOOR: one member's certainty must not veto a class alone."""
    return np.log(np.clip(probs, STACK_FLOOR, None))


def stack_features(probs: np.ndarray) -> np.ndarray:
    """(M, n, C) probabilities -> (n, M*C) clipped log-probabilities, member-major."""
    return np.concatenate(list(_log_floor(probs)), axis=1)


def _fit_product(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative w minimising the NLL of softmax(sum_m w_m log p_m): log-linear pooling
    (a product of experts). The weights' sum plays the temperature, so one member alone
    reduces to temperature scaling; members that add information lower the NLL further."""
    from scipy.optimize import minimize  # ~1 s to import; only fitting weights needs it

    logp = _log_floor(probs)  # (M, n, C)
    rows = np.arange(probs.shape[1])
    gold = logp[:, rows, y]  # (M, n)

    def loss(a: np.ndarray) -> tuple[float, np.ndarray]:
        w = np.exp(a)  # w > 0 through its log: unconstrained for L-BFGS
        z = np.einsum("m,mnc->nc", w, logp)
        z = z - z.max(axis=1, keepdims=True)
        logq = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        expected = np.einsum("nc,mnc->mn", np.exp(logq), logp)  # E_q[log p_m]
        g_w = -(gold - expected).mean(axis=1)
        return float(-logq[rows, y].mean()), g_w * w

    res = minimize(loss, np.zeros(probs.shape[0]), jac=True, method="L-BFGS-B")
    return np.exp(res.x)


def _fit_weights(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Simplex weights w minimising the NLL of sum_m w_m p_m (softmax-parametrised)."""
    from scipy.optimize import minimize  # ~1 s to import; only fitting weights needs it

    gold = probs[:, np.arange(probs.shape[1]), y]  # (M, n): each member's p[gold]

    def loss(a: np.ndarray) -> tuple[float, np.ndarray]:
        w = softmax(a)
        q = np.clip(w @ gold, EPS, None)  # (n,)
        g_w = -(gold / q).mean(axis=1)  # dNLL/dw
        return float(-np.log(q).mean()), w * (g_w - w @ g_w)  # chain rule through softmax

    res = minimize(loss, np.zeros(probs.shape[0]), jac=True, method="L-BFGS-B")
    return softmax(res.x)


def cross_fit(
    combiner: Combiner, probs: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Out-of-fold ensemble probabilities on the validation split (n, C).

    A trainable combiner is refitted on k-1 folds and predicts the k-th; a fixed one just
    predicts. `combiner` itself is left as it was.
    """
    if not combiner.trainable:
        return combiner.predict(probs)
    n = probs.shape[1]
    counts = np.bincount(y, minlength=combiner.classes)
    smallest = int(counts[counts > 0].min())
    if smallest >= 2:
        splitter: Any = StratifiedKFold(
            n_splits=min(folds, smallest), shuffle=True, random_state=seed
        )
    else:
        splitter = KFold(n_splits=min(folds, n), shuffle=True, random_state=seed)
    out = np.zeros((n, combiner.classes))
    for fit_idx, held_idx in splitter.split(np.zeros(n), y):
        part = Combiner(combiner.method, combiner.members, combiner.classes, combiner.meta_c)
        if combiner.method == "stack" and len(np.unique(y[fit_idx])) < 2:
            part.method = "mean"  # a fold with one class cannot train a meta-learner
        out[held_idx] = part.fit(probs[:, fit_idx], y[fit_idx]).predict(probs[:, held_idx])
    return out
