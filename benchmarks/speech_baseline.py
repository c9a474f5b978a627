"""The scale beside the `speech` recipe: log-mel statistics + logistic regression on
`spoken_words`, trained on the training voices and scored on the held-out voices.

Features per clip (train/baselines.audio_statistics: the features a run's
`train.baselines` fits for an audio task): bitblend's own batched log-mel front end
(models/audio.py, 64 bands, 1 s clips at 16 kHz, per-clip standardised), then per band the
mean over each quarter of the clip's frames and the standard deviation over all of them
(64 x 5 = 320 numbers);
scikit-learn's LogisticRegression on standardised features. No CNN, no transformer.

    .venv/bin/python benchmarks/speech_baseline.py [--c 1.0]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bitblend.data.builtin import load_builtin
from bitblend.train.baselines import audio_statistics


def main() -> None:
    """Print held-out-voice accuracy of the baseline as one JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--c", type=float, default=1.0, help="inverse L2 strength")
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    src = load_builtin("spoken_words")
    assert src.eval is not None and src.train.audio is not None and src.eval.audio is not None
    xtr = audio_statistics(src.train.audio, src.train.audio_rate, 16000, 1.0, 64)
    xev = audio_statistics(src.eval.audio, src.eval.audio_rate, 16000, 1.0, 64)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=args.c, max_iter=2000))
    clf.fit(xtr, src.train.labels)
    acc = float(np.mean(clf.predict(xev) == np.asarray(src.eval.labels)))
    print(json.dumps({"baseline": "log-mel stats + logistic regression", "eval_accuracy": acc,
                      "train": len(xtr), "eval": len(xev), "eval_voices_held_out": True,
                      "seconds": round(time.perf_counter() - t0, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
