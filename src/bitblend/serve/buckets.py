"""Length-bucketed padding for a gathered batch of text rows.

A batch pads every row to its longest; one long request in a batch of short ones would
multiply the batch's work. Rows are split by token count into power-of-two classes
(<= 16, 17-32, 33-64, ...), so each row is padded to at most about twice its length, and
each class runs as its own forward. Runs whose rows are not tokenised here (tfidf,
ensembles) run as one table.

A batch is tokenised once: the lengths that pick the buckets come from the same encoded
split the forward runs on (tokenising a batch of 32 news articles again per bucket cost
as much as ~1 ms per row). Forwards run under `torch.inference_mode()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from bitblend.data.modalities import EncodedSplit
from bitblend.data.table import Table
from bitblend.runs.base import Predictor
from bitblend.runs.transformer import TransformerRun
from bitblend.train.evaluate import predict_outputs

Outputs = Callable[[str, Table], np.ndarray]  # (task, table) -> raw outputs (n, outputs)
MIN_BUCKET = 16  # tokens: below this, padding costs less than another forward


def length_buckets(lengths: np.ndarray) -> list[np.ndarray]:
    """Row indices grouped by power-of-two length class, shortest class first."""
    cls = np.ceil(np.log2(np.maximum(lengths, MIN_BUCKET))).astype(np.int64)
    return [np.flatnonzero(cls == c) for c in np.unique(cls)]


def take_split(split: EncodedSplit, idx: np.ndarray) -> EncodedSplit:
    """The rows `idx` of an encoded split (every per-row field)."""
    pick = [int(i) for i in idx]
    return replace(
        split,
        targets=split.targets[idx],
        lengths=split.lengths[idx],
        ids=None if split.ids is None else [split.ids[i] for i in pick],
        token_labels=None if split.token_labels is None else [split.token_labels[i] for i in pick],
        patches=None if split.patches is None else split.patches[idx],
        tabular=None if split.tabular is None else split.tabular[idx],
    )


def bucketed(run: Predictor, tokenized: TransformerRun | None) -> Outputs:
    """`run.outputs`, split by length bucket when `tokenized` (the run whose tokenizer
    encodes the rows: `run` itself, or an ONNX engine's base) is given; the outputs come
    back in the table's row order."""
    if tokenized is None:
        return run.outputs
    base = tokenized

    def forward(task: str, split: EncodedSplit) -> np.ndarray:
        if run is base:
            _, cfg = base.task(task)
            return predict_outputs(base.model, task, split, base.batch_spec(cfg))[0]
        return run.outputs_encoded(task, split)  # type: ignore[attr-defined]

    def infer(task: str, table: Table) -> np.ndarray:
        _, cfg = base.task(task)
        with torch.inference_mode():
            split = base.encode(cfg, table, np.zeros(len(table), dtype=np.float32))
            groups = length_buckets(np.asarray(split.lengths))
            if len(groups) == 1:
                return forward(task, split)
            parts = [(idx, forward(task, take_split(split, idx))) for idx in groups]
        out = np.empty((len(table), parts[0][1].shape[1]), dtype=parts[0][1].dtype)
        for idx, o in parts:
            out[idx] = o
        return out

    return infer
