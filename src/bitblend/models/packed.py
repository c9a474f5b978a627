"""The attention mask of packed rows: block-diagonal over documents (causal inside each
for decoders), built from the `segment_ids` that data/packing.py gives every token.

transformers (5.x) takes a 4D mask as given for every family that builds its masks with
masking_utils (Llama, GPT-2, BERT, ...), and so does bitblend's own kernel
(models/attention.py), so one boolean tensor serves every backbone and attention backend.
"""

from __future__ import annotations

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
