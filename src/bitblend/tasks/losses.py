"""Per-task losses, always computed in fp32 whatever the precision recipe.

The seed's three: cross-entropy, binary cross-entropy (-1/N sum[y log p + (1-y) log(1-p)],
computed from logits for stability) and mean squared error; plus their token-level forms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100

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


def compute_loss(
    loss: str, logits: torch.Tensor, labels: torch.Tensor, head: str = "classification"
) -> torch.Tensor:
    """Mean loss over the batch (over labelled tokens for token-level heads).

    logits: (batch, outputs) or (batch, seq, outputs); labels: (batch,), (batch, K) or
    (batch, seq) with IGNORE where no loss applies.
    """
    logits = logits.float()
    if head == "causal_lm":
        # Position t predicts token t+1.
        logits, labels = logits[:, :-1], labels[:, 1:]
    if loss == "cross_entropy":
        if logits.ndim == 3:
            return F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE
            )
        return F.cross_entropy(logits, labels)
    if loss == "bce":
        if head == "binary":
            logits = logits.squeeze(-1)
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    if loss == "mse":
        return F.mse_loss(logits.squeeze(-1), labels.float())
    raise ValueError(f"unknown loss {loss!r}")
