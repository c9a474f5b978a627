"""Per-task losses, always computed in fp32 whatever the precision recipe."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resolve_loss(head: str, loss: str) -> str:
    """The concrete loss name for a head (`auto` -> cross_entropy / mse)."""
    if loss != "auto":
        return loss
    return "cross_entropy" if head == "classification" else "mse"


def compute_loss(loss: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean loss over the batch. logits: (batch, outputs); labels: (batch,)."""
    logits = logits.float()
    if loss == "cross_entropy":
        return F.cross_entropy(logits, labels)
    if loss == "mse":
        return F.mse_loss(logits.squeeze(-1), labels.float())
    raise ValueError(f"unknown loss {loss!r}")
