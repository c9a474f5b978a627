"""Inputs -> model tensors. Text for now: tokenise once, pad per batch (dynamic padding)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class EncodedSplit:
    """Token ids (unpadded) and targets of one split of one task."""

    ids: list[list[int]]
    targets: list[Any]
    lengths: np.ndarray  # (n,) token counts, used for length-grouped batching
    regression: bool

    def __len__(self) -> int:
        return len(self.ids)


def encode_texts(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of every text, truncated to `max_length`, no padding yet."""
    out = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
    return [list(x) for x in out["input_ids"]]


def encode_split(
    tokenizer: Any, texts: list[str], targets: list[Any], max_length: int, regression: bool
) -> EncodedSplit:
    """Tokenise a split once; batches are padded later, each to its own longest example."""
    ids = encode_texts(tokenizer, texts, max_length)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    return EncodedSplit(ids, list(targets), lengths, regression)


def collate(
    split: EncodedSplit, indices: np.ndarray | list[int], pad_id: int, multiple: int
) -> dict[str, torch.Tensor]:
    """Pad the chosen examples to the batch's longest (rounded up to `multiple`).

    Returns input_ids (batch, seq) int64, attention_mask (batch, seq) int64, and labels
    (batch,) int64 for classification or float32 for regression.
    """
    rows = [split.ids[i] for i in indices]
    longest = max(len(r) for r in rows)
    seq = -(-longest // multiple) * multiple
    input_ids = torch.full((len(rows), seq), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), seq), dtype=torch.long)
    for j, r in enumerate(rows):
        input_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[j, : len(r)] = 1
    targets = [split.targets[i] for i in indices]
    labels = torch.tensor(targets, dtype=torch.float32 if split.regression else torch.long)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
