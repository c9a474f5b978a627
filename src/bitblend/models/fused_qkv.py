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

from typing import TypeGuard

import torch
from torch import nn

# (query, key, value) attribute names per attention-block family.
_TRIPLES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))


class _Slot:
    """The projections the query layer computed, waiting for the key and value layers.
    Not a Module, so it registers no parameters and stays out of the state_dict."""

    __slots__ = ("disabled", "input", "outputs")

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None
        self.outputs: dict[int, torch.Tensor] = {}
        # Set for good the first time the block calls key or value on anything but the
        # query's input (cross-attention, another call order): each layer then computes
        # itself, so no wasted k/v and no slice held between calls.
        self.disabled = False

    def clear(self) -> None:
        self.input = None
        self.outputs = {}


class FusedQueryLinear(nn.Linear):
    """The query projection; also computes the key and value projections."""

    _bitblend_group: tuple[nn.Linear, nn.Linear, _Slot]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        key, value, slot = self.__dict__["_bitblend_group"]
        if slot.disabled:
            return super().forward(input)
        weight = torch.cat((self.weight, key.weight, value.weight))
        bias = None if self.bias is None else torch.cat((self.bias, key.bias, value.bias))
        q, k, v = nn.functional.linear(input, weight, bias).split(
            (self.out_features, key.out_features, value.out_features), dim=-1
        )
        slot.input = input
        slot.outputs = {id(key): k, id(value): v}
        return q


class FusedSliceLinear(nn.Linear):
    """A key or value projection: hands out the slice the query layer computed for this
    exact input, or computes itself (and turns the fusion off for its block)."""

    _bitblend_slot: _Slot

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        slot = self.__dict__["_bitblend_slot"]
        out = slot.outputs.pop(id(self), None) if slot.input is input else None
        if out is not None:
            if not slot.outputs:
                slot.clear()  # both handed out: hold no activations between calls
            return out
        if not slot.disabled:
            slot.disabled = True
            slot.clear()
        return super().forward(input)


def _plain(layer: object) -> TypeGuard[nn.Linear]:
    """A Linear whose forward is nn.Linear's on its own registered parameters: no wrapped
    forward (precision.keep_fp32), no pre-hooks that recompute the weight (pruning,
    hook-based weight_norm / spectral_norm, per-layer sharding)."""
    return (
        isinstance(layer, nn.Linear)
        and type(layer) is nn.Linear  # exactly: subclasses (fp8 layers, already fused) differ
        and "forward" not in layer.__dict__
        and "weight" in layer._parameters
        and not layer._forward_pre_hooks
    )


def fuse_qkv(model: nn.Module) -> int:
    """Give every attention block of `model` whose query/key/value are plain Linear layers
    of one input width, one dtype and the same bias presence the fused projection, in
    place; returns how many blocks. Not thread-safe: one model, one forward at a time
    (as training runs); a block whose key/value ever see another input unfuses itself."""
    fused = 0
    for module in model.modules():
        for names in _TRIPLES:
            layers = [layer for n in names if _plain(layer := getattr(module, n, None))]
            if len(layers) != 3:
                continue
            q, k, v = layers
            if not q.in_features == k.in_features == v.in_features:
                continue
            if len({p.dtype for layer in layers for p in layer.parameters()}) != 1:
                continue
            if len({layer.bias is None for layer in layers}) != 1:
                continue  # some with a bias, some without: not worth a special case
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
