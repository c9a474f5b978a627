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

Off CPU (CUDA SDPA has fused dropout), for decoding with a cache, for features it does
not implement (grouped KV heads, position bias, softcap, attention weights output), or for
a dropout rate the 1/65536 grid cannot carry (below 2^-17 it would round to no dropout,
above 1 - 2^-17 to dropping everything) it hands the call to transformers' SDPA function
unchanged.

Semantics follow that SDPA function: a module without `is_causal` is causal (transformers'
default); a boolean mask keeps True; a float mask is added to the scores in fp32 (so a large
negative fp32 value cannot overflow to -inf in bf16/fp16), and a query whose float-mask row
is all -inf gets a zero output, as SDPA gives. One known difference: a query whose
boolean-mask row is all False (nothing to attend to; bitblend's right-padded batches never
make one) gets the mean of the values, as HF's eager attention gives, where SDPA gives
zeros; detecting such rows would cost a reduction over the mask in every layer of the
common path.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

from bitblend.models.packed import DOCUMENTS_CAUSAL_KWARG, DOCUMENTS_KWARG
from bitblend.models.varlen import varlen_attention

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


def _plain_cpu_call(query: torch.Tensor, key: torch.Tensor, kw: dict[str, Any]) -> bool:
    """What both of bitblend's CPU paths need: CPU tensors, no decoding with a cache (as
    many keys as queries), none of the extras they do not implement."""
    return (
        query.device.type == "cpu"
        and query.shape[2] == key.shape[2]
        and kw.get("position_bias") is None
        and kw.get("softcap") is None
        and not kw.get("output_attentions", False)
    )


def _eligible(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, dropout: float, kw: dict[str, Any]
) -> bool:
    return (
        _plain_cpu_call(query, key, kw)
        and (dropout == 0.0 or on_grid(dropout))
        and query.shape[1] == key.shape[1]  # no grouped KV heads
        and getattr(module, "num_key_value_groups", 1) == 1
    )


def _varlen_eligible(
    query: torch.Tensor, key: torch.Tensor, dropout: float, kw: dict[str, Any]
) -> bool:
    """Per-document attention (models/varlen.py) computes what the block-diagonal mask
    does only without dropout (CPU flash SDPA has none); grouped k/v heads are fine."""
    return _plain_cpu_call(query, key, kw) and dropout == 0.0


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

    spans = kwargs.pop(DOCUMENTS_KWARG, None)  # packed rows' documents (models/varlen.py)
    causal_docs = kwargs.pop(DOCUMENTS_CAUSAL_KWARG, None)
    if (
        spans is not None
        and causal_docs is not None
        and _varlen_eligible(query, key, dropout, kwargs)
    ):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return varlen_attention(query, key, value, spans, scale, bool(causal_docs)), None
    if not _eligible(module, query, key, dropout, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    s = query.shape[2]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    # Scaling q (s x d) is cheaper than scaling the (s x s) scores.
    scores = torch.matmul(query * scale, key.transpose(-1, -2))
    # transformers' SDPA function: a module that does not say is causal (decoders' default).
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and s > 1:
        attention_mask = torch.ones(s, s, dtype=torch.bool, device=query.device).tril()
    # Boolean masks: half the dtype's range rather than -inf or its lowest value: a masked
    # score then stays finite even after adding a negative score in fp16 (lowest - 20
    # overflows there), and a row with every key masked averages instead of giving NaN.
    # exp() of a masked key is 0 either way, so the other rows are exactly what -inf gives.
    big = torch.finfo(scores.dtype).max / 2
    dead = None  # (..., s, 1) True where a float-mask row is all -inf: SDPA gives 0 there
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            # An additive (batch, 1, s, s) bias, built small and added in place: the add's
            # backward is the identity, where masked_fill would copy the (s x s) scores and
            # their gradient.
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
        # In place is safe: matmul saves its inputs, not its output.
        scores = scores.add_(bias)
    probs = torch.softmax(scores, dim=-1)
    if probs.dtype != value.dtype:  # fp32 after a float mask
        probs = probs.to(value.dtype)
    if dropout > 0.0:
        mask, rate = keep_mask(probs.shape, dropout, probs.device)
        probs = probs * mask.view(torch.uint8)  # not where(): see dropout()
        # 1/(1-rate) applied to v (s x d) rather than to the (s x s) probabilities.
        value = value * (1.0 / (1.0 - rate))
    out = torch.matmul(probs, value)
    if dead is not None:
        out = out.masked_fill(dead, 0.0)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `attn_implementation="bitblend"` known to transformers (idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
    # Same masks as SDPA: boolean (True = attend), or None when there is nothing to mask.
    AttentionMaskInterface.register(NAME, sdpa_mask)
