"""Fit every task's simple baseline (tasks/baselines.py) on exactly the run's splits.

The train split is the one the task's sampler draws from; the eval split is the first
`train.eval_max_examples` rows of the task's eval split, the rows `evaluate_split` scores,
in the same order. Each result carries a digest of those row ids so a reader (and the
tests) can check that the baseline saw the run's rows and no others.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import torch

from bitblend.data.audio import fit_clips
from bitblend.data.sources import TaskData
from bitblend.data.table import Table
from bitblend.models.audio import LogMel
from bitblend.tasks.baselines import SplitInputs, fit_baseline


def rows_digest(table: Table) -> str:
    """sha256 (first 16 hex digits) of a split's source row ids, in order."""
    rows = np.arange(len(table)) if table.rows is None else table.rows
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


def audio_statistics(
    clips: list[np.ndarray], source_rate: int, rate: int, seconds: float, n_mels: int
) -> np.ndarray:
    """(n, 5 * n_mels) float32 per clip, from the same batched log-mel front end the trunk
    uses (models/audio.py): per band the mean over each quarter of the clip's frames and the
    standard deviation over all of them. The audio baseline's features (no CNN, no trunk)."""
    wave = fit_clips(clips, source_rate, rate, max(1, round(seconds * rate)))  # as taskspec
    front = LogMel(rate, n_mels)
    out = []
    with torch.no_grad():
        for s in range(0, len(wave), 256):
            x = torch.from_numpy(wave[s : s + 256])
            lengths = (~torch.isnan(x)).sum(dim=1)
            mel, frames = front(torch.nan_to_num(x), lengths)  # (b, T, M)
            for b in range(mel.shape[0]):
                m = mel[b, : max(1, int(frames[b]))]
                parts = [q.mean(dim=0) for q in torch.tensor_split(m, 4)]
                out.append(torch.cat([*parts, m.std(dim=0, unbiased=False)]).numpy())
    return np.stack(out).astype(np.float32)


def _inputs(table: Table, targets: np.ndarray, cfg: Any = None) -> SplitInputs:
    audio = None
    if table.audio is not None and cfg is not None:
        audio = audio_statistics(
            table.audio, table.audio_rate, cfg.sample_rate, cfg.clip_seconds, cfg.n_mels
        )
    return SplitInputs(
        targets=np.asarray(targets),
        text=None if table.text is None else [str(t) for t in table.text],
        image=table.image,
        tabular=table.tabular,
        audio=audio,
    )


def task_baseline(
    head: str, data: TaskData, limit: int | None, seed: int, cfg: Any = None
) -> dict[str, Any]:
    """One task's baseline result, with the row digests of the splits it used (`cfg`: the
    task's config, for the audio settings)."""
    n = len(data.eval) if limit is None else min(limit, len(data.eval))
    eval_table = data.eval.take(np.arange(n))
    out = fit_baseline(
        head,
        _inputs(data.train, data.train_targets, cfg),
        _inputs(eval_table, data.eval_targets[:n], cfg),
        seed,
    )
    if out["model"] is not None:
        out["train_rows_sha256"] = rows_digest(data.train)
        out["eval_rows_sha256"] = rows_digest(eval_table)
    return out


def run_baselines(tasks: list[Any], limit: int | None, seed: int) -> dict[str, Any]:
    """{task name: result} for a trainer's tasks (TaskRuntime: .cfg.head, .data), plus
    `_seconds`, the time all of them took (summary.json reports it against the wall time)."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {
        t.cfg.name: task_baseline(t.cfg.head, t.data, limit, seed, t.cfg) for t in tasks
    }
    return {"tasks": out, "seconds": time.perf_counter() - t0}
