"""bitblend's CPU attention kernel and cheap dropout masks, registered with transformers.

Why: on CPU, PyTorch's SDPA has no fused kernel that supports dropout, so training with
attention dropout runs its math path, which upcasts bf16 to fp32 for both batched matmuls
and the softmax, and draws the dropout mask with `bernoulli_` — a serial Mersenne-Twister
call per element (the single largest op in a MiniLM bf16 step's profile). Without dropout,
its fused CPU kernel is slower than plain bmm + softmax at BERT's sequence lengths.

This kernel computes what HF's eager attention computes under autocast — scores and
probabilities in the compute dtype (softmax accumulates in fp32 internally), matmuls with
fp32 accumulation — and draws dropout masks from 16-bit slices of full-range 64-bit random
integers (one generator call per 4 elements, then a vectorised compare). The drop rate is
rounded to a multiple of 1/65536 and the kept values are scaled by the rounded rate, so the
expectation is exact. Masks are saved as bool (1 byte) where SDPA's math path saves a
dropout noise tensor of the input dtype.

Grouped k/v heads (Llama) stay grouped (see `_attend`), and causal models run by blocks of
queries that skip the scores above the diagonal (`_causal_blocks`): at Llama's sequence
lengths this is 2.5-3x faster than CPU flash SDPA forward + backward, which recomputes the
probabilities in backward where this kernel saves them (10/16 of the (s x s) in causal
blocks at 512 tokens).

Off CPU (CUDA SDPA has fused dropout), for decoding with a cache, for features it does
not implement (position bias, softcap, attention weights output), or for
a dropout rate the 1/65536 grid cannot carry (below 2^-17 it would round to no dropout,
above 1 - 2^-17 to dropping everything) it hands the call to transformers' SDPA function
unchanged.

Semantics follow that SDPA function: a module without `is_causal` that passes no mask is
causal (transformers' default); a boolean mask keeps True; a float mask is added to the
scores in fp32 (so a large negative fp32 value cannot overflow to -inf in bf16/fp16), and a
query whose float-mask row is all -inf gets a zero output, as SDPA gives. One known
difference: a query whose boolean-mask row is all False (nothing to attend to; bitblend's
right-padded batches never make one) gets the mean of the values, as HF's eager attention
gives, where SDPA gives zeros; detecting such rows would cost a reduction over the mask in
every layer of the common path.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

NAME = "bitblend"  # the attn_implementation name models are built with
_RANDOM_LEVELS = 1 << 16


_P = TypeVar("_P", float, None)


def resolve_dropouts(
    hidden: _P, attention: _P, dropout: float | None, attention_dropout: float | None
) -> tuple[_P | float, _P | float]:
    """A model's (hidden, attention-probability) dropout after the recipe's overrides:
    `model.dropout` sets both, then `model.attention_dropout` the attention one; None
    keeps the value. The one rule the backbone builders and the cost model share."""
    new_hidden = hidden if dropout is None else dropout
    new_attention = attention if dropout is None else dropout
    if attention_dropout is not None:
        new_attention = attention_dropout
    return new_hidden, new_attention


def on_grid(p: float) -> bool:
    """True when `keep_mask` can draw rate `p`: it rounds to a multiple of 1/65536 strictly
    between 0 and 1 (so neither silently no dropout nor a division by zero)."""
    return 0 < round(p * _RANDOM_LEVELS) < _RANDOM_LEVELS


def keep_mask(
    shape: torch.Size | tuple[int, ...], p: float, device: torch.device
) -> tuple[torch.Tensor, float]:
    """(bool mask with True = keep, the drop rate actually used) for dropout rate `p`.

    The rate is rounded to a multiple of 1/65536 (0.1 -> 0.100006); callers scale by
    1 / (1 - rate) with the returned rate so kept activations stay unbiased.
    """
    if not on_grid(p):
        raise ValueError(
            f"keep_mask: dropout rate {p} rounds to {round(p * _RANDOM_LEVELS)}/65536; "
            "rates outside [2^-17, 1 - 2^-17) need F.dropout"
        )
    n = 1
    for d in shape:
        n *= int(d)
    threshold = round(p * _RANDOM_LEVELS)
    # random_(min int64, None) draws the full 64-bit range (the default leaves the top bit
    # 0, which would bias every fourth 16-bit slice).
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    mask = bits.view(torch.int16)[:n].view(shape) >= threshold - _RANDOM_LEVELS // 2
    return mask, threshold / _RANDOM_LEVELS


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout with a cheap mask on CPU; `F.dropout` elsewhere."""
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu" or not on_grid(p):
        return nn.functional.dropout(x, p, True)  # exact at any rate (and checks p <= 1)
    mask, rate = keep_mask(x.shape, p, x.device)
    # Multiplying by the mask viewed as uint8 (free) rather than where(): PyTorch's CPU
    # where kernel is not vectorised: a MiniLM bf16 training step ran 10% faster with the
    # mul (in-process A/B). The mul saves only the 1-byte mask for backward, the scalar
    # multiply nothing. (A non-finite input now gives NaN where dropped, as F.dropout does.)
    return x * mask.view(torch.uint8) * (1.0 / (1.0 - rate))


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU training path draws its mask with `keep_mask` (drop-in: same
    `p`, same state_dict, same behaviour in eval)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(input)
        return dropout(input, self.p, self.training)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every plain nn.Dropout in `model` for `Dropout` in place; returns how many."""
    swapped = 0
    for module in model.modules():
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                fast = Dropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(module, name, fast)
                swapped += 1
    return swapped


def _eligible(query: torch.Tensor, key: torch.Tensor, dropout: float, kw: dict[str, Any]) -> bool:
    """CPU tensors, no decoding with a cache (as many keys as queries), whole groups of
    query heads per k/v head, a dropout rate on the grid, none of the extras not
    implemented here."""
    return (
        query.device.type == "cpu"
        and query.shape[2] == key.shape[2]
        and query.shape[1] % key.shape[1] == 0
        and (dropout == 0.0 or on_grid(dropout))
        and kw.get("position_bias") is None
        and kw.get("softcap") is None
        and not kw.get("output_attentions", False)
    )


CAUSAL_BLOCK = 128  # query rows per block of causal attention (see _causal_blocks)


def query_blocks(s: int) -> list[tuple[int, int]]:
    """(start, end) of each block of CAUSAL_BLOCK queries of a causal row of `s` tokens;
    a block attends to the keys before `end`. One block up to CAUSAL_BLOCK tokens. The
    kernel runs these, and the estimate prices them (estimate/memory.py)."""
    return [(a, min(a + CAUSAL_BLOCK, s)) for a in range(0, s, CAUSAL_BLOCK)]


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: (batch, heads, seq, head_dim) inputs,
    (batch, seq, heads, head_dim) output, as `sdpa_attention_forward`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _eligible(query, key, dropout, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    s = query.shape[2]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    declared = is_causal if is_causal is not None else getattr(module, "is_causal", None)
    if declared is True:
        # Only a model that says it is causal is run in blocks: its mask hides every later
        # key. (Some encoders carry no `is_causal`; their masks are bidirectional.)
        out = _causal_blocks(query, key, value, attention_mask, scale, dropout)
    else:
        # transformers' SDPA function: a module that does not say is causal is, when it
        # passes no mask (decoders' default).
        if attention_mask is None and declared is not False and s > 1:
            attention_mask = torch.ones(s, s, dtype=torch.bool, device=query.device).tril()
        out = _attend(query, key, value, attention_mask, scale, dropout)
    return out.transpose(1, 2).contiguous(), None


def _causal_blocks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    dropout: float,
) -> torch.Tensor:
    """Causal attention by blocks of CAUSAL_BLOCK queries (`query_blocks`), each against the
    keys up to its last query: the scores above the diagonal's blocks are neither computed
    nor saved for backward (at 512 tokens 6 of 16 (128 x 128) blocks are skipped).
    Whatever mask the model passes is causal, so the keys left out are masked for these
    queries anyway. Without a mask each block gets its part of the causal one."""
    # Contiguous once, and in autocast's dtype once (Llama's RoPE returns fp32 keys under
    # bf16-mixed: its cos/sin follow the fp32 residual stream): each block's keys and
    # values are then a prefix view the matmuls take as is, where every block copied (and
    # saved for backward) its own cast of them.
    device = key.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        key, value = key.to(dtype), value.to(dtype)
    key, value = key.contiguous(), value.contiguous()
    outs = []
    for start, end in query_blocks(query.shape[2]):
        if mask is None:
            block = torch.ones(end - start, end, dtype=torch.bool, device=query.device)
            block = block.tril(diagonal=start)
        else:
            block = mask[..., start:end, :end]
        outs.append(_attend(query[:, :, start:end], key[:, :, :end], value[:, :, :end],
                            block, scale, dropout))  # fmt: skip
    return torch.cat(outs, dim=2)


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    dropout: float,
) -> torch.Tensor:
    """(b, heads, n, d) queries against (b, kv_heads, m, d) keys and values -> (b, heads, n,
    d). Grouped k/v heads are not repeated: the queries of a group are stacked into one
    (groups x n, d) matrix per k/v head, one larger matmul instead of `groups` copies of
    k and v (at llama-30m's 6 heads over 2, 8 x 512 tokens: 26 ms forward + backward
    against 68 for CPU flash SDPA, and 21 ms in causal blocks; docs/benchmarks.md)."""
    b, heads, n, d = query.shape
    kv_heads, m = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    # bmm over 3-D views: a prefix of contiguous keys (_causal_blocks) is taken as is, and
    # k's transpose is a flag to BLAS, where 4-D matmul copied (and saved) both per call.
    k = key.reshape(b * kv_heads, m, d)
    v = value.reshape(b * kv_heads, m, d)
    # Scaling q (n x d) is cheaper than scaling the (n x m) scores.
    q = (query * scale).reshape(b * kv_heads, groups * n, d)
    scores = torch.bmm(q, k.transpose(1, 2)).view(b, kv_heads, groups * n, m)
    # Boolean masks: half the dtype's range rather than -inf or its lowest value: a masked
    # score then stays finite even after adding a negative score in fp16 (lowest - 20
    # overflows there), and a row with every key masked averages instead of giving NaN.
    # exp() of a masked key is 0 either way, so the other rows are exactly what -inf gives.
    big = torch.finfo(scores.dtype).max / 2
    dead = None  # (..., n, 1) True where a float-mask row is all -inf: SDPA gives 0 there
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            # An additive bias, built small and added in place: the add's backward is the
            # identity, where masked_fill would copy the (n x m) scores and their gradient.
            bias = torch.zeros(attention_mask.shape, dtype=scores.dtype, device=scores.device)
            bias.masked_fill_(~attention_mask, -big)
        else:
            # A float (additive) mask is added in fp32, as SDPA's CPU kernels do: cast to
            # bf16/fp16 a large negative fp32 value would become -inf (a fully masked row:
            # NaN) and the scores would be rounded to the mask's spacing. -inf itself is
            # clamped to fp32's lowest (finite sums, no NaN in backward) and its all -inf
            # rows zeroed below. Not the common path: transformers' masks are boolean.
            bias = attention_mask.float().clamp(min=torch.finfo(torch.float32).min)
            dead = torch.isneginf(attention_mask).all(dim=-1, keepdim=True)
            if not bool(dead.any()):
                dead = None
            scores = scores.float()
        # The mask's head axis (1 or heads) split into (kv head, group), to meet the scores
        # seen as (b, kv_heads, groups, n, m). In place is safe: matmul saves its inputs.
        if bias.dim() == 4 and bias.shape[1] == heads:
            bias = bias.view(bias.shape[0], kv_heads, groups, n, m)
        else:
            bias = bias.unsqueeze(-3)
        scores = scores.view(b, kv_heads, groups, n, m).add_(bias).view(b, kv_heads, -1, m)
    probs = torch.softmax(scores, dim=-1)
    if probs.dtype != value.dtype:  # fp32 after a float mask
        probs = probs.to(value.dtype)
    if dropout > 0.0:
        mask, rate = keep_mask(probs.shape, dropout, probs.device)
        probs = probs * mask.view(torch.uint8)  # not where(): see dropout()
        # 1/(1-rate) applied to v (m x d) rather than to the (n x m) probabilities.
        v = v * (1.0 / (1.0 - rate))
    out = torch.bmm(probs.view(b * kv_heads, groups * n, m), v).view(b, heads, n, d)
    if dead is not None:
        out = out.masked_fill(dead, 0.0)
    return out


def register() -> None:
    """Make `attn_implementation="bitblend"` known to transformers (idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
    # Same masks as SDPA: boolean (True = attend), or None when there is nothing to mask.
    AttentionMaskInterface.register(NAME, sdpa_mask)
