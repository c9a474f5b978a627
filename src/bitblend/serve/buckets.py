"""Length-bucketed padding for a gathered batch of text rows.

A batch pads every row to its longest; one long request in a batch of short ones would
multiply the batch's work. Rows are split by token count into power-of-two classes
(<= 16, 17-32, 33-64, ...), so each row is padded to at most about twice its length, and
each class runs as its own forward. Runs whose rows are not tokenised here (tfidf,
ensembles) run as one table.
"""

from __future__ import annotations

import numpy as np

from bitblend.data.table import Table
from bitblend.runs.base import Predictor
from bitblend.runs.transformer import TransformerRun
from bitblend.serve.batcher import Infer

MIN_BUCKET = 16  # tokens: below this, padding costs less than another forward


def length_buckets(lengths: np.ndarray) -> list[np.ndarray]:
    """Row indices grouped by power-of-two length class, shortest class first."""
    cls = np.ceil(np.log2(np.maximum(lengths, MIN_BUCKET))).astype(np.int64)
    return [np.flatnonzero(cls == c) for c in np.unique(cls)]


def bucketed(run: Predictor, tokenized: TransformerRun | None) -> Infer:
    """`run.outputs`, split by length bucket when `tokenized` (the run whose tokenizer
    encodes the rows) is given; the outputs come back in the table's row order."""
    if tokenized is None:
        return run.outputs
    base = tokenized

    def infer(task: str, table: Table) -> np.ndarray:
        if len(table) < 2 or table.text is None:
            return run.outputs(task, table)
        _, cfg = base.task(task)
        lengths = base.encode(cfg, table, np.zeros(len(table), dtype=np.float32)).lengths
        groups = length_buckets(np.asarray(lengths))
        if len(groups) == 1:
            return run.outputs(task, table)
        parts = [(idx, run.outputs(task, table.take(idx))) for idx in groups]
        out = np.empty((len(table), parts[0][1].shape[1]), dtype=parts[0][1].dtype)
        for idx, o in parts:
            out[idx] = o
        return out

    return infer
