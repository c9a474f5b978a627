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

Each document is padded to a multiple of `BUCKET` tokens before SDPA: PyTorch's CPU flash
kernel keeps state per sequence length in its bf16 backward and never frees it, so one
length per document grew a llama-15m run's malloc'd bytes by ~40 MiB a step (~900 MiB
after 300 distinct lengths in a micro-benchmark, 105 MiB with lengths bucketed by 64;
fp32 did not grow). Padded keys sit after every real query, so causal attention never
sees them; bidirectional attention masks them out. Padded queries' outputs are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BUCKET = 64  # documents' lengths are padded up to a multiple of this (see the docstring)


def _document(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, groups: int
) -> torch.Tensor:
    """(heads, n, dim) q and (kv_heads, n, dim) k/v of one document -> (heads, n, dim)."""
    n = q.shape[1]
    pad = -n % BUCKET
    mask = None
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        if not causal:  # a real query must not see the padded keys
            mask = (torch.arange(n + pad, device=q.device) < n).view(1, 1, 1, n + pad)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, is_causal=causal,
        scale=scale, enable_gqa=groups > 1,
    )[0]  # fmt: skip
    return out[:, :n] if pad else out


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
                pieces.append(_document(q, k, v, scale, causal, groups))
            else:  # padding: each query attends to itself alone
                pieces.append(v.repeat_interleave(groups, dim=0) if groups > 1 else v)
        rows.append(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])
    return torch.stack(rows).transpose(1, 2).contiguous()
