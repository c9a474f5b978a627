"""The simple model a user would try first, per task kind, fitted beside a run.

A number from the trunk means little without it: .95 accuracy is good on a task where
logistic regression gets .80 and poor where it gets .99. For every task of a run this
module fits, with scikit-learn, on the run's own train split and scores on the run's own
eval split (the rows the run evaluates, in its order):

- text classification / binary: TF-IDF (words, sublinear tf) + logistic regression
- text regression: TF-IDF + ridge
- small images: logistic regression on the standardised pixels (flattened)
- tabular classification / binary: standardised logistic regression and scikit-learn's
  HistGradientBoosting; both are reported, and the headline is the better of the two on the
  eval split (so it is an optimistic bar: harder for the run to reach, never easier)
- image / tabular regression: ridge on the standardised inputs
- audio: logistic regression (ridge for regression) on standardised log-mel statistics
  (per band: the mean over each quarter of the clip and the deviation over all of it),
  which train/baselines.py computes with the run's own log-mel front end

Anything else (token classification, language modelling, multilabel, inputs that mix
modalities) has no baseline here and says so with a reason instead of inventing one.
Works on plain arrays (no data/ or train/ import): `train/baselines.py` feeds it a run's
splits.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from bitblend.tasks import metrics as M

# The metric a task's baseline is compared on, per head, and whether higher is better.
MAIN_METRIC = {"classification": "accuracy", "binary": "accuracy", "regression": "mse"}


@dataclass
class SplitInputs:
    """One split of one task as plain arrays (one modality column set, targets)."""

    targets: np.ndarray  # (n,) class ids / 0-1 / values
    text: list[str] | None = None
    image: np.ndarray | None = None  # (n, H, W, C) float32
    tabular: np.ndarray | None = None  # (n, F) float32, NaN = missing
    audio: np.ndarray | None = None  # (n, F) float32 log-mel statistics per clip

    @property
    def modalities(self) -> list[str]:
        """Names of the input columns present."""
        return [m for m in ("text", "image", "tabular", "audio") if getattr(self, m) is not None]


def no_baseline_reason(head: str, modalities: list[str]) -> str | None:
    """Why a task gets no baseline (None when it gets one)."""
    if head not in MAIN_METRIC:
        return f"no simple baseline for a {head} head"
    if not modalities:
        return "no input column this baseline reads"
    if len(modalities) != 1:
        return f"no simple baseline for {'+'.join(modalities)} inputs together"
    return None


def _candidates(head: str, modality: str, seed: int) -> dict[str, Any]:
    """scikit-learn estimators by baseline name, for one head and input modality."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    regression = head == "regression"
    if modality == "text":
        # Unigrams: on the demo's corpora as accurate as 1-2 grams (BBC .991 vs .982, R8
        # .975 vs .973, tweets .938 vs .940) at a third of the CPU time.
        tfidf = TfidfVectorizer(sublinear_tf=True)
        if regression:
            return {"tfidf-ridge": make_pipeline(tfidf, Ridge(alpha=1.0))}
        # C=10 as the tfidf-logreg backbone (config/classic.py): TF-IDF rows are unit-norm,
        # so the default C=1 underfits.
        lr = LogisticRegression(C=10.0, max_iter=2000, random_state=seed)
        return {"tfidf-logreg": make_pipeline(tfidf, lr)}

    def scaled(model: Any) -> Any:
        # Missing values (NaN) -> the train mean; then zero mean, unit variance per input.
        return make_pipeline(SimpleImputer(keep_empty_features=True), StandardScaler(), model)

    if regression:
        return {"ridge": scaled(Ridge(alpha=1.0))}
    out = {"logreg": scaled(LogisticRegression(max_iter=2000, random_state=seed))}
    if modality == "tabular":
        out["hgb"] = HistGradientBoostingClassifier(random_state=seed)
    return out


def _features(split: SplitInputs, modality: str) -> Any:
    if modality == "text":
        return ["" if t is None else str(t) for t in split.text or []]
    if modality == "image":
        assert split.image is not None
        return split.image.reshape(len(split.image), -1).astype(np.float64)
    values = split.audio if modality == "audio" else split.tabular
    assert values is not None
    return values.astype(np.float64)


def _score(head: str, model: Any, x: Any, gold: np.ndarray) -> dict[str, float]:
    if head == "regression":
        return M.regression_metrics(np.asarray(model.predict(x)), gold)
    if head == "binary":
        return M.binary_metrics(np.asarray(model.decision_function(x), dtype=np.float64), gold)
    return M.classification_metrics(np.asarray(model.predict(x)), gold)


def fit_baseline(
    head: str, train: SplitInputs, evaluation: SplitInputs, seed: int = 0
) -> dict[str, Any]:
    """Fit the baseline(s) of a task on `train`, score on `evaluation`.

    Returns {model, metric, value, metrics, candidates, train_examples, eval_examples,
    seconds}, or {model: None, reason} for a kind without a baseline.
    """
    reason = no_baseline_reason(head, train.modalities)
    if reason is not None:
        return {"model": None, "reason": reason}
    t0 = time.perf_counter()
    modality = train.modalities[0]
    x_train, x_eval = _features(train, modality), _features(evaluation, modality)
    y_train = train.targets.astype(np.float64 if head == "regression" else np.int64)
    gold = evaluation.targets
    if head != "regression" and len(np.unique(y_train)) < 2:
        return {"model": None, "reason": "the train split holds one class only"}
    candidates: dict[str, dict[str, float]] = {}
    for name, model in _candidates(head, modality, seed).items():
        # One thread: HistGradientBoosting's OpenMP pool spins against torch's on a busy
        # 2-core machine (0.13 s of CPU took 60 s of wall clock); lbfgs may stop at
        # max_iter, and its fit is still a fair baseline.
        with threadpool_limits(limits=1), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(x_train, y_train)
            candidates[name] = _score(head, model, x_eval, gold)
    metric = MAIN_METRIC[head]
    pick = min if metric == "mse" else max
    best = pick(candidates, key=lambda n: candidates[n][metric])
    return {
        "model": best,
        "metric": metric,
        "value": candidates[best][metric],
        "metrics": candidates[best],
        "candidates": candidates,
        "train_examples": len(y_train),
        "eval_examples": len(gold),
        "seconds": time.perf_counter() - t0,
    }
