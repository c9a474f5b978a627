"""Inputs -> model tensors, per modality: text token ids, image patches, tabular features,
audio waveforms (resampled, cut or padded; the model computes their log-mels per batch).

A split is encoded once (`encode_split`); each batch is then padded to its own longest
example (`collate`, dynamic padding). A missing modality or feature is never zero-filled
as if it were data: it gets a 0 in its attention mask, so the trunk cannot see it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bitblend.config.schema import IGNORE
from bitblend.data.audio import fit_clips
from bitblend.data.images import patchify
from bitblend.data.packing import pack, packed_labels, segment_positions
from bitblend.data.table import Table

POOLED_HEADS = ("classification", "binary", "multilabel", "regression")


@dataclass
class EncodedSplit:
    """One split of one task, ready to batch. Shapes are per example unless noted."""

    head: str
    targets: (
        np.ndarray
    )  # (n,) int64 class / float32 value, (n, K) multi-hot; unused for token heads
    lengths: np.ndarray  # (n,) tokens the trunk sees per example (text + patches + features)
    ids: list[list[int]] | None = None  # text token ids, unpadded
    token_labels: list[list[int]] | None = None  # token classification, aligned to ids
    patches: np.ndarray | None = None  # (n, P, patch_dim) float32; NaN rows = missing image
    tabular: np.ndarray | None = None  # (n, F) float32 standardised, NaN = missing feature
    audio: np.ndarray | None = None  # (n, samples) float32 at the task's rate, NaN = padding
    # Packed LM rows (data/packing.py): each token's document within its row, 1-based.
    segments: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.lengths)


@dataclass
class TabularStats:
    """Per-feature mean and std of the training split (applied to eval and predict too)."""

    mean: np.ndarray  # (F,)
    std: np.ndarray  # (F,)

    @classmethod
    def fit(cls, x: np.ndarray) -> TabularStats:
        """Statistics ignoring missing (NaN) values; constant features get std 1."""
        with np.errstate(all="ignore"):
            mean = np.nan_to_num(np.nanmean(x, axis=0))
            std = np.nan_to_num(np.nanstd(x, axis=0), nan=1.0)
        std[std < 1e-12] = 1.0
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Standardise; NaN stays NaN (it marks a missing feature)."""
        return ((x - self.mean) / self.std).astype(np.float32)


def encode_texts(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of every text, truncated to `max_length`, no padding yet."""
    out = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
    return [list(x) for x in out["input_ids"]]


def encode_words(
    tokenizer: Any, words: list[list[str]], tags: list[list[int]], max_length: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Token classification: sub-word ids and labels (first sub-word of a word carries its tag)."""
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    ids, labels = [], []
    for i, row in enumerate(enc["input_ids"]):
        prev = None
        lab = []
        for wid in enc.word_ids(i):
            lab.append(IGNORE if wid is None or wid == prev else tags[i][wid])
            prev = wid
        ids.append(list(row))
        labels.append(lab)
    return ids, labels


def encode_split(
    table: Table,
    head: str,
    targets: np.ndarray,
    *,
    tokenizer: Any = None,
    max_length: int = 128,
    patch: int | None = None,
    stats: TabularStats | None = None,
    audio: tuple[int, int, int] | None = None,
) -> EncodedSplit:
    """Encode every modality column of `table` present (text needs `tokenizer`; audio needs
    `audio` = (sample rate, samples per clip, patches per clip))."""
    n = len(table)
    lengths = np.zeros(n, dtype=np.int64)
    split = EncodedSplit(head=head, targets=targets, lengths=lengths)
    if table.text is not None:
        if head == "token_classification":
            split.ids, split.token_labels = encode_words(
                tokenizer, table.text, [list(t) for t in targets], max_length
            )
        else:
            texts = ["" if t is None else str(t) for t in table.text]
            split.ids = encode_texts(tokenizer, texts, max_length)
        lengths += np.fromiter((len(x) for x in split.ids), dtype=np.int64, count=n)
    if table.image is not None:
        size = table.image.shape[1]
        split.patches = patchify(table.image.astype(np.float32), patch or max(1, size // 4))
        lengths += split.patches.shape[1]
    if table.tabular is not None:
        raw = table.tabular.astype(np.float32)
        split.tabular = (stats or TabularStats.fit(raw)).apply(raw)
        lengths += split.tabular.shape[1]
    if table.audio is not None:
        if audio is None:
            raise ValueError("audio data needs the task's (rate, samples, patches)")
        rate, samples, patches = audio
        split.audio = fit_clips(table.audio, table.audio_rate, rate, samples)
        lengths += patches
    return split


def encode_documents(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of whole documents for packing: special tokens added, never truncated."""
    # verbose=False: documents longer than the tokenizer's model_max_length are expected.
    enc = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
    return [list(x) for x in enc["input_ids"]]


def pack_eos(tokenizer: Any, head: str) -> int | None:
    """The separator packing puts after each document: [SEP] for masked_lm, else EOS."""
    return tokenizer.sep_token_id if head == "masked_lm" else tokenizer.eos_token_id


def encode_packed(
    tokenizer: Any, texts: list[str], head: str, max_length: int, targets: np.ndarray
) -> EncodedSplit:
    """Tokenise whole documents (no truncation: long ones continue in the next row) and
    pack them; the split's examples are the packed rows."""
    ids, segments = [], []
    for row, seg in pack(encode_documents(tokenizer, texts), max_length, pack_eos(tokenizer, head)):
        ids.append(row)
        segments.append(seg)
    lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
    return EncodedSplit(head=head, targets=targets[:0], lengths=lengths, ids=ids, segments=segments)


def collate(
    split: EncodedSplit,
    indices: np.ndarray | list[int],
    pad_id: int,
    multiple: int,
    *,
    mask_token: int | None = None,
    vocab_size: int = 0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One padded batch. Keys present depend on the modalities and head:

    input_ids, attention_mask (batch, seq) int64 for text; image (batch, P, D) float32 with
    image_mask (batch, P); tabular (batch, F) float32 with tabular_mask (batch, F); audio
    (batch, samples) float32 waveforms, zero-padded, with audio_len (batch,) int64; labels:
    (batch,) int64 class ids, (batch,) float32 values, (batch, K) float32 multi-hot, or
    (batch, seq) int64 token labels with IGNORE where no loss applies.
    """
    idx = np.asarray(indices, dtype=np.int64)
    batch: dict[str, torch.Tensor] = {}
    if split.ids is not None:
        rows = [split.ids[i] for i in idx]
        longest = max(1, max(len(r) for r in rows))
        seq = -(-longest // multiple) * multiple
        input_ids = torch.full((len(rows), seq), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), seq), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, : len(r)] = 1
        batch["input_ids"], batch["attention_mask"] = input_ids, mask
        if split.segments is not None:
            return _collate_packed(split, idx, batch, mask_token, vocab_size, generator)
        if split.head == "token_classification":
            labels = torch.full((len(rows), seq), IGNORE, dtype=torch.long)
            for j, i in enumerate(idx):
                lab = split.token_labels[i]  # type: ignore[index]
                labels[j, : len(lab)] = torch.tensor(lab, dtype=torch.long)
            batch["labels"] = labels
        elif split.head == "causal_lm":
            batch["labels"] = input_ids.masked_fill(mask == 0, IGNORE)
        elif split.head == "masked_lm":
            batch["input_ids"], batch["labels"] = mask_tokens(
                input_ids, mask, mask_token, vocab_size, generator
            )
    if split.patches is not None:
        img = torch.from_numpy(split.patches[idx])
        present = ~torch.isnan(img).any(dim=2)  # (batch, P): a missing image is all NaN
        batch["image"] = torch.nan_to_num(img)
        batch["image_mask"] = present.long()
    if split.tabular is not None:
        tab = torch.from_numpy(split.tabular[idx])
        batch["tabular_mask"] = (~torch.isnan(tab)).long()
        batch["tabular"] = torch.nan_to_num(tab)
    if split.audio is not None:
        wave = torch.from_numpy(split.audio[idx])  # (batch, samples), NaN past each clip
        batch["audio_len"] = (~torch.isnan(wave)).sum(dim=1)
        batch["audio"] = torch.nan_to_num(wave)
    if split.head in POOLED_HEADS:
        batch["labels"] = torch.from_numpy(np.ascontiguousarray(split.targets[idx]))
    return batch


def _collate_packed(
    split: EncodedSplit,
    idx: np.ndarray,
    batch: dict[str, torch.Tensor],
    mask_token: int | None,
    vocab_size: int,
    generator: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    """Packed rows: `segment_ids` (batch, seq; 0 = padding) and per-document
    `position_ids`, from which the trunk builds the block-diagonal mask; labels never
    cross a document boundary and padding carries none."""
    input_ids = batch["input_ids"]
    segments = torch.zeros_like(input_ids)
    for j, i in enumerate(idx):
        seg = split.segments[i]  # type: ignore[index]
        segments[j, : len(seg)] = torch.tensor(seg, dtype=torch.long)
    batch["segment_ids"] = segments
    batch["position_ids"] = segment_positions(segments)
    if split.head == "causal_lm":
        batch["labels"] = packed_labels(input_ids, segments)
    else:  # masked_lm: never mask a document's first ([CLS]) or last ([SEP]) token
        pos = batch["position_ids"]
        last = torch.ones_like(segments, dtype=torch.bool)
        last[:, :-1] = segments[:, 1:] != segments[:, :-1]
        eligible = (segments > 0) & (pos > 0) & ~last
        batch["input_ids"], batch["labels"] = mask_tokens(
            input_ids, batch["attention_mask"], mask_token, vocab_size, generator,
            eligible=eligible,
        )  # fmt: skip
    return batch


def mask_tokens(
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    mask_token: int | None,
    vocab_size: int,
    generator: torch.Generator | None,
    prob: float = 0.15,
    eligible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: 15% of real tokens are predicted; of those 80% [MASK], 10% random, 10% kept.

    The first and last real tokens ([CLS]/[SEP]) are never chosen; `eligible` (batch, seq)
    bool overrides which positions may be (packed rows: each document's inner tokens).
    """
    if mask_token is None:
        raise ValueError("masked_lm needs a tokenizer with a mask token")
    if eligible is None:
        lengths = mask.sum(dim=1)
        pos = torch.arange(input_ids.shape[1]).unsqueeze(0)
        eligible = (pos > 0) & (pos < (lengths - 1).unsqueeze(1))
    draw = torch.rand(input_ids.shape, generator=generator)
    chosen = eligible & (draw < prob)
    labels = input_ids.masked_fill(~chosen, IGNORE)
    how = torch.rand(input_ids.shape, generator=generator)
    out = input_ids.clone()
    out[chosen & (how < 0.8)] = mask_token
    rand_pos = chosen & (how >= 0.8) & (how < 0.9)
    out[rand_pos] = torch.randint(vocab_size, input_ids.shape, generator=generator)[rand_pos]
    return out, labels
