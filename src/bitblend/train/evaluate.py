"""Running heads over a split and scoring them: shared by training, `eval` and `predict`."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

from bitblend.data.modalities import EncodedSplit, collate
from bitblend.models.trunk import MultiTaskModel
from bitblend.tasks.losses import compute_loss
from bitblend.tasks.metrics import classification_metrics, regression_metrics


@torch.no_grad()
def predict_outputs(
    model: MultiTaskModel,
    task: str,
    split: EncodedSplit,
    *,
    context: Callable[[], AbstractContextManager[Any]],
    device: torch.device,
    batch_size: int,
    pad_id: int,
    multiple: int,
    loss: str | None = None,
    limit: int | None = None,
) -> tuple[np.ndarray, float]:
    """Head outputs (n, outputs) in the split's order, and the mean loss (nan without `loss`)."""
    n = len(split) if limit is None else min(limit, len(split))
    order = np.argsort(split.lengths[:n], kind="stable")  # length-sorted: little padding
    outputs = np.zeros((n, model.specs[task].num_outputs), dtype=np.float32)
    loss_sum = 0.0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate(split, idx, pad_id, multiple).items()}
            with context():
                logits = model(task, batch["input_ids"], batch["attention_mask"])
            if loss is not None:
                loss_sum += float(compute_loss(loss, logits, batch["labels"])) * len(idx)
            outputs[idx] = logits.float().cpu().numpy()
    finally:
        model.train(was_training)
    return outputs, (loss_sum / max(n, 1)) if loss is not None else float("nan")


def score(head: str, outputs: np.ndarray, gold: list[Any]) -> dict[str, float]:
    """Accuracy + macro-F1 for classification, MSE + MAE for regression."""
    target = np.asarray(gold[: len(outputs)])
    if head == "classification":
        return classification_metrics(outputs.argmax(axis=1), target)
    return regression_metrics(outputs[:, 0], target)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (for reported probabilities)."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
