"""Running heads over a split and scoring them: shared by training, `eval` and `predict`."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bitblend.data.modalities import IGNORE, POOLED_HEADS, EncodedSplit, collate
from bitblend.models.trunk import MultiTaskModel
from bitblend.tasks import metrics as M
from bitblend.tasks.losses import compute_loss


@dataclass
class BatchSpec:
    """How to build batches for one task: padding, device, precision context, MLM masking."""

    context: Callable[[], AbstractContextManager[Any]]
    device: torch.device
    batch_size: int
    pad_id: int
    multiple: int
    mask_token: int | None = None
    vocab_size: int = 0

    def collate(
        self, split: EncodedSplit, idx: np.ndarray, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """A padded batch on the device."""
        batch = collate(
            split,
            idx,
            self.pad_id,
            self.multiple,
            mask_token=self.mask_token,
            vocab_size=self.vocab_size,
            generator=generator,
        )
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def _batches(split: EncodedSplit, limit: int | None, size: int) -> tuple[int, list[np.ndarray]]:
    """The first `limit` examples sorted by length (little padding), longest first: on CPU
    the first batch lays out the largest blocks and every later, shorter one fits the
    holes it leaves. Shortest first, each batch's blocks were a little larger than the
    last one's holes and were laid out on top: a four-task mixture's first evaluation
    (4,167 examples, batches of 64) grew the heap by 466 MiB while its live bytes stayed
    below a training step's (docs/estimate.md)."""
    n = len(split) if limit is None else min(limit, len(split))
    # stable on the negated lengths: ties keep the split's order, as ascending did
    order = np.argsort(-split.lengths[:n].astype(np.int64), kind="stable")
    return n, [order[s : s + size] for s in range(0, n, size)]


@torch.no_grad()
def predict_outputs(
    model: MultiTaskModel,
    task: str,
    split: EncodedSplit,
    spec: BatchSpec,
    *,
    loss: str | None = None,
    limit: int | None = None,
) -> tuple[np.ndarray, float]:
    """Pooled heads: outputs (n, outputs) in the split's order and the mean loss (or nan)."""
    n, batches = _batches(split, limit, spec.batch_size)
    outputs = np.zeros((n, model.specs[task].num_outputs), dtype=np.float32)
    loss_sum = 0.0
    was_training = model.training
    model.eval()
    try:
        for idx in batches:
            batch = spec.collate(split, idx)
            with spec.context():
                logits = model(task, **batch)
            if loss is not None:
                head = model.specs[task].head
                loss_sum += float(compute_loss(loss, logits, batch["labels"], head)) * len(idx)
            outputs[idx] = logits.float().cpu().numpy()
    finally:
        model.train(was_training)
    return outputs, (loss_sum / max(n, 1)) if loss is not None else float("nan")


@torch.no_grad()
def _token_eval(
    model: MultiTaskModel, task: str, split: EncodedSplit, spec: BatchSpec, loss: str,
    limit: int | None, seed: int,
) -> dict[str, float]:  # fmt: skip
    head = model.specs[task].head
    _, batches = _batches(split, limit, spec.batch_size)
    # MLM masks are random: a fixed generator makes every evaluation use the same masks.
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    preds: list[np.ndarray] = []
    golds: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    try:
        for idx in batches:
            batch = spec.collate(split, idx, gen)
            with spec.context():
                logits = model(task, **batch)
            labels = batch["labels"][:, 1:] if head == "causal_lm" else batch["labels"]
            k = int((labels != IGNORE).sum())
            if k:
                total += float(compute_loss(loss, logits, batch["labels"], head)) * k
                count += k
            if head == "token_classification":
                keep = batch["labels"] != IGNORE
                preds.append(logits.argmax(-1)[keep].cpu().numpy())
                golds.append(batch["labels"][keep].cpu().numpy())
    finally:
        model.train(was_training)
    mean = total / max(count, 1)
    out = {"loss": mean, "tokens": float(count)}
    if head == "token_classification":
        out |= M.token_metrics(np.concatenate(preds), np.concatenate(golds))
    else:
        out |= M.lm_metrics(mean)
    return out


def score(head: str, outputs: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Metrics of a pooled head from its outputs and targets."""
    target = gold[: len(outputs)]
    if head == "classification":
        return M.classification_metrics(outputs.argmax(axis=1), target)
    if head == "binary":
        return M.binary_metrics(outputs[:, 0], target)
    if head == "multilabel":
        return M.multilabel_metrics(outputs, target)
    return M.regression_metrics(outputs[:, 0], target)


def evaluate_split(
    model: MultiTaskModel,
    task: str,
    split: EncodedSplit,
    spec: BatchSpec,
    loss: str,
    limit: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Every metric of `task` on `split`, plus its mean loss and example count."""
    head = model.specs[task].head
    if head in POOLED_HEADS:
        out, mean = predict_outputs(model, task, split, spec, loss=loss, limit=limit)
        return {**score(head, out, split.targets), "loss": mean, "examples": len(out)}
    res = _token_eval(model, task, split, spec, loss, limit, seed)
    return {**res, "examples": min(len(split), limit or len(split))}
