"""Per-task losses, always computed in fp32 whatever the precision recipe.

The seed's three: cross-entropy, binary cross-entropy (-1/N sum[y log p + (1-y) log(1-p)],
computed from logits for stability) and mean squared error; plus their token-level forms.

Gradient accumulation: a token-level loss is a mean over labelled tokens, and the micro-
batches of one optimizer step hold different numbers of them. Averaging each micro-batch's
mean would weigh a token of a short micro-batch more than one of a long micro-batch, so the
step passes `num_items` (the labelled tokens of the whole step, counted by `loss_items`
before any forward) and each micro-batch contributes its token sum over that count, as
transformers does with `num_items_in_batch`. The parts of a step then add up to the step's
per-token mean, whatever the split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitblend.config.schema import IGNORE, TOKEN_HEADS

DEFAULT_LOSS = {
    "classification": "cross_entropy",
    "binary": "bce",
    "multilabel": "bce",
    "regression": "mse",
    "token_classification": "cross_entropy",
    "masked_lm": "cross_entropy",
    "causal_lm": "cross_entropy",
}


def resolve_loss(head: str, loss: str) -> str:
    """The concrete loss name for a head (`auto` -> its default)."""
    return DEFAULT_LOSS[head] if loss == "auto" else loss


def loss_items(head: str, labels: torch.Tensor) -> int:
    """How many terms the loss of this batch averages: labelled tokens for token-level heads
    (after causal_lm's shift), examples otherwise."""
    if head not in TOKEN_HEADS:
        return int(labels.shape[0])
    if head == "causal_lm":
        labels = labels[:, 1:]
    return int((labels != IGNORE).sum())


def compute_loss(
    loss: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    head: str = "classification",
    num_items: int | None = None,
) -> torch.Tensor:
    """Mean loss over the batch (over labelled tokens for token-level heads).

    logits: (batch, outputs) or (batch, seq, outputs); labels: (batch,), (batch, K) or
    (batch, seq) with IGNORE where no loss applies. `num_items` (token-level heads): divide
    the token sum by this count instead of by the batch's own (see the module docstring);
    a batch without labelled tokens then gives 0 rather than nan.
    """
    logits = logits.float()
    if head == "causal_lm":
        # Position t predicts token t+1.
        logits, labels = logits[:, :-1], labels[:, 1:]
    if loss == "cross_entropy":
        if logits.ndim == 3:
            flat = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
            if num_items is None:
                return F.cross_entropy(*flat, ignore_index=IGNORE)
            return F.cross_entropy(*flat, ignore_index=IGNORE, reduction="sum") / max(num_items, 1)
        return F.cross_entropy(logits, labels)
    if loss == "bce":
        if head == "binary":
            logits = logits.squeeze(-1)
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    if loss == "mse":
        return F.mse_loss(logits.squeeze(-1), labels.float())
    raise ValueError(f"unknown loss {loss!r}")
