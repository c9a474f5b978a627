"""Packed rows' attention one document at a time ("varlen"), on CPU.

Why: a packed row's block-diagonal mask (models/packed.py) makes PyTorch's CPU flash
kernel compute every (query block, key block) pair of the row and mask afterwards: it
skips blocks only for `is_causal`, never for a mask. Run per document it computes each
document and nothing across documents: less work where rows hold several short documents;
on BBC rows (about one article each) its speed is within noise of the mask's
(docs/benchmarks.md). The same function as the mask: a query sees the keys of its own
document (up to itself when causal); a padding query sees only itself, so its output is
its own value (the mask's diagonal), and carries no loss.

The document boundaries come as a tensor; the loop over them reads its values, so the
function is kept out of torch.compile'd graphs (a graph break at attention) rather than
guarded on, which would recompile every batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.compiler.disable
def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spans: torch.Tensor,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """(batch, heads, seq, dim) query, (batch, kv_heads, seq, dim) key/value, `spans` from
    `document_spans` -> (batch, seq, heads, dim), as transformers' attention functions."""
    groups = query.shape[1] // key.shape[1]
    # unbind + split: their backwards are one stack and one cat per row. Indexing each
    # document out (q[row, :, start:end]) would cost a zero-filled full-size gradient per
    # document in backward (measured: copy_ and fill_ took a fifth of the step).
    per_row: list[list[tuple[int, int]]] = [[] for _ in range(query.shape[0])]
    for row, start, end, real in spans.tolist():
        per_row[row].append((end - start, real))
    rows = []
    for q_row, k_row, v_row, docs in zip(
        query.unbind(0), key.unbind(0), value.unbind(0), per_row, strict=True
    ):
        sizes = [n for n, _ in docs]
        pieces = []
        for q, k, v, (_, real) in zip(
            q_row.split(sizes, dim=1), k_row.split(sizes, dim=1), v_row.split(sizes, dim=1),
            docs, strict=True,
        ):  # fmt: skip
            if real:
                pieces.append(F.scaled_dot_product_attention(
                    q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=causal,
                    scale=scale, enable_gqa=groups > 1,
                )[0])  # fmt: skip
            else:  # padding: each query attends to itself alone
                pieces.append(v.repeat_interleave(groups, dim=0) if groups > 1 else v)
        rows.append(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])
    return torch.stack(rows).transpose(1, 2).contiguous()
