"""The scale beside the `speech` recipe: log-mel statistics + logistic regression on
`spoken_words`, trained on the training voices and scored on the held-out voices.

Features per clip: bitblend's own batched log-mel front end (models/audio.py, 64 bands,
1 s clips at 16 kHz, per-clip standardised), then per band the mean over each quarter of
the clip's frames and the standard deviation over all of them (64 x 5 = 320 numbers);
scikit-learn's LogisticRegression on standardised features. No CNN, no transformer.

    .venv/bin/python benchmarks/speech_baseline.py [--c 1.0]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from bitblend.data.audio import fit_clips
from bitblend.data.builtin import load_builtin
from bitblend.models.audio import LogMel


def features(clips: list[np.ndarray], rate: int, front: LogMel) -> np.ndarray:
    """(n, 5 * n_mels): quarter-clip band means and whole-clip band deviations."""
    wave = fit_clips(clips, rate, 16000, 16000)
    out = []
    for s in range(0, len(wave), 256):
        x = torch.from_numpy(wave[s : s + 256])
        lengths = (~torch.isnan(x)).sum(dim=1)
        mel, frames = front(torch.nan_to_num(x), lengths)  # (b, T, M)
        rows = []
        for b in range(mel.shape[0]):
            m = mel[b, : max(1, int(frames[b]))]
            parts = [q.mean(dim=0) for q in torch.tensor_split(m, 4)]
            rows.append(torch.cat([*parts, m.std(dim=0, unbiased=False)]))
        out.append(torch.stack(rows).numpy())
    return np.concatenate(out)


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
    front = LogMel(16000, 64)
    with torch.no_grad():
        xtr = features(src.train.audio, src.train.audio_rate, front)
        xev = features(src.eval.audio, src.eval.audio_rate, front)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=args.c, max_iter=2000))
    clf.fit(xtr, src.train.labels)
    acc = float(np.mean(clf.predict(xev) == np.asarray(src.eval.labels)))
    print(json.dumps({"baseline": "log-mel stats + logistic regression", "eval_accuracy": acc,
                      "train": len(xtr), "eval": len(xev), "eval_voices_held_out": True,
                      "seconds": round(time.perf_counter() - t0, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
