"""One matmul for a self-attention block's query, key and value projections.

Why: transformers' BERT-family and Llama-family attention blocks call three separate
Linear layers on the same hidden states. On CPU under bf16 autocast each call casts that
fp32 input to bf16 again (autocast caches weight casts, not activation casts), runs a
narrow (hidden x hidden) matmul, and in backward sums three input gradients. One
(hidden x 3*hidden) matmul over the concatenated weights does the same arithmetic with one
cast, one wider matmul and one input gradient.

How, without touching the model's code or its state_dict: the three Linear modules stay
where they are (same parameters, same keys, saved run directories stay plain
transformers); only their classes change. The query layer, called first with the hidden
states, computes all three projections and leaves the key and value slices with the other
two layers, which hand them out when called with that very same input tensor (and compute
normally otherwise: cross-attention, caches, any other call order).
"""

from __future__ import annotations

import torch
from torch import nn

# (query, key, value) attribute names per attention-block family.
_TRIPLES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))


class _Slot:
    """The projections the query layer computed, waiting for the key and value layers.
    Not a Module, so it registers no parameters and stays out of the state_dict."""

    __slots__ = ("input", "outputs")

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None
        self.outputs: dict[int, torch.Tensor] = {}

    def clear(self) -> None:
        self.input = None
        self.outputs = {}


class FusedQueryLinear(nn.Linear):
    """The query projection; also computes the key and value projections."""

    _bitblend_group: tuple[nn.Linear, nn.Linear, _Slot]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        key, value, slot = self.__dict__["_bitblend_group"]
        weight = torch.cat((self.weight, key.weight, value.weight))
        bias = None
        if self.bias is not None and key.bias is not None and value.bias is not None:
            bias = torch.cat((self.bias, key.bias, value.bias))
        elif self.bias is not None or key.bias is not None or value.bias is not None:
            slot.clear()  # mixed bias / no bias: nothing to gain, keep it simple
            return super().forward(input)
        q, k, v = nn.functional.linear(input, weight, bias).split(
            (self.out_features, key.out_features, value.out_features), dim=-1
        )
        slot.input = input
        slot.outputs = {id(key): k, id(value): v}
        return q


class FusedSliceLinear(nn.Linear):
    """A key or value projection: hands out the slice the query layer computed for this
    exact input, or computes itself."""

    _bitblend_slot: _Slot

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        slot = self.__dict__["_bitblend_slot"]
        if slot.input is input:
            out = slot.outputs.pop(id(self), None)
            if not slot.outputs:
                slot.clear()  # both handed out: hold no activations between calls
            if out is not None:
                return out
        return super().forward(input)


def fuse_qkv(model: nn.Module) -> int:
    """Give every self-attention block of `model` with plain Linear query/key/value
    layers of one input width the fused projection, in place; returns how many blocks."""
    fused = 0
    for module in model.modules():
        for names in _TRIPLES:
            found = [getattr(module, n, None) for n in names]
            layers = [layer for layer in found if type(layer) is nn.Linear]
            if len(layers) != 3:
                continue
            q, k, v = layers
            if not q.in_features == k.in_features == v.in_features:
                continue
            if len({p.dtype for layer in layers for p in layer.parameters()}) != 1:
                continue
            if any("forward" in layer.__dict__ for layer in layers):
                continue  # a wrapped forward (precision.keep_fp32's run_in_fp32) stays as is
            slot = _Slot()
            q.__class__ = FusedQueryLinear
            q.__dict__["_bitblend_group"] = (k, v, slot)
            for layer in (k, v):
                layer.__class__ = FusedSliceLinear
                layer.__dict__["_bitblend_slot"] = slot
            fused += 1
    return fused


def unfuse_qkv(model: nn.Module) -> None:
    """Undo `fuse_qkv` (plain nn.Linear layers again)."""
    for module in model.modules():
        if isinstance(module, FusedQueryLinear | FusedSliceLinear):
            module.__dict__.pop("_bitblend_group", None)
            module.__dict__.pop("_bitblend_slot", None)
            object.__setattr__(module, "__class__", nn.Linear)
