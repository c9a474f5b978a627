"""The attention mask of packed rows: block-diagonal over documents (causal inside each
for decoders), built from the `segment_ids` that data/packing.py gives every token.

transformers (5.x) takes a 4D mask as given for every family that builds its masks with
masking_utils (Llama, GPT-2, BERT, ...), and so does bitblend's own kernel
(models/attention.py), so one boolean tensor serves every backbone and attention backend.
"""

from __future__ import annotations

from typing import Any

import torch


def document_mask(
    segments: torch.Tensor, causal: bool, additive: torch.dtype | None = None
) -> torch.Tensor:
    """(batch, seq) segment ids (0 = padding) -> (batch, 1, seq, seq) bool, True = attend;
    with `additive` a float mask of that dtype instead (0 = attend, its lowest value =
    masked), as transformers' eager attention adds the mask to the scores.

    A query attends to keys of its own document (and, causal, not after itself). A padding
    query attends to itself alone: no row is all False (SDPA would give NaN gradients or
    zeros, eager attention a mean); its output carries no loss anyway.
    """
    same = segments.unsqueeze(2) == segments.unsqueeze(1)  # (batch, seq, seq)
    real = (segments > 0).unsqueeze(2)
    seq = segments.shape[1]
    eye = torch.eye(seq, dtype=torch.bool, device=segments.device)
    allowed = (same & real) | eye
    if causal:
        allowed = allowed & torch.ones(seq, seq, dtype=torch.bool, device=segments.device).tril()
    allowed = allowed.unsqueeze(1)
    if additive is None:
        return allowed
    zero = torch.zeros((), dtype=additive, device=segments.device)
    return zero.masked_fill(~allowed, torch.finfo(additive).min)


def backbone_mask(backbone: torch.nn.Module, segments: torch.Tensor, causal: bool) -> torch.Tensor:
    """`document_mask` in the form the backbone's attention takes: additive for eager."""
    config = getattr(backbone, "config", None)
    if getattr(config, "_attn_implementation", None) == "eager":
        dtype = next(backbone.parameters()).dtype
        return document_mask(segments, causal, dtype if dtype.is_floating_point else None)
    return document_mask(segments, causal)


DOCUMENTS_KWARG = "bitblend_documents"  # the backbone kwarg the varlen kernel reads
DOCUMENTS_CAUSAL_KWARG = "bitblend_documents_causal"  # and whether documents are causal


def document_spans(segments: torch.Tensor) -> torch.Tensor:
    """(batch, seq) segment ids -> (n, 4) int64 rows (row, start, end, is_document): every
    maximal run of one segment id, in order, so the runs of a row tile it. Padding runs
    (segment 0) have is_document 0. A tensor (not a list) so that torch.compile'd blocks
    take it as an input rather than guarding on its values (models/varlen.py)."""
    seq = segments.shape[1]
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    rows, cols = starts.nonzero(as_tuple=True)
    ends = torch.empty_like(cols)
    ends[:-1] = cols[1:]
    last = torch.ones_like(rows, dtype=torch.bool)  # a row's last run ends at seq
    last[:-1] = rows[1:] != rows[:-1]
    ends[last] = seq
    real = (segments[rows, cols] > 0).long()
    return torch.stack([rows, cols, ends, real], dim=1)


def packed_kwargs(
    backbone: torch.nn.Module, segments: torch.Tensor, causal: bool
) -> dict[str, Any]:
    """The documents of packed rows for bitblend's attention kernel on CPU, which then runs
    each document alone (models/varlen.py), causal as the trunk's mask is (one source of
    truth: a module's own `is_causal` is missing on some encoders); nothing for other
    attention implementations or devices, which use the mask alone."""
    config = getattr(backbone, "config", None)
    if getattr(config, "_attn_implementation", None) != "bitblend":
        return {}
    if segments.device.type != "cpu":  # spans are read on CPU only (and nonzero syncs)
        return {}
    return {DOCUMENTS_KWARG: document_spans(segments), DOCUMENTS_CAUSAL_KWARG: causal}
