"""A frozen backbone's weights stored in 16, 8 or 4 bits (`precision.base_bits`).

With `model.adapter.kind: lora` the backbone's weights never change, so they need neither
gradients nor optimizer state nor full precision at rest (QLoRA). Every frozen Linear (and
GPT-2 Conv1D) of the backbone becomes a `FrozenBaseLinear` whose weight is stored as

- 16: bf16 (2 bytes per weight);
- 8: int8 with one fp32 absmax scale per output row (1 byte + 4 / in_features);
- 4: torchao's NF4Tensor (4-bit normal-float codes in blocks of 64, double-quantised block
  scales: ~0.52 bytes per weight),

and dequantised per matmul into the compute dtype (autocast's under a mixed recipe, the
input's otherwise). Backward dequantises again instead of keeping the full-precision weight
alive between forward and backward: that copy would cost what the format saves.

Frozen embedding tables (word, position) become `FrozenBaseEmbedding`s: bf16 for 16, int8
rows with per-row scales for 8 and 4 (NF4 blocks have no row gather); a lookup dequantises
only the rows it reads. In an encoder like MiniLM the word table is half the parameters, so
leaving it at 4 bytes would dominate the model state. A table tied to another module (an LM
head reading the same tensor) keeps its format.

A frozen LM head (`model.adapter.train_lm_head: false`: the checkpoint's own head, outside
the backbone under `heads.`) becomes a FrozenBaseLinear too, in bf16 for 16 and int8 rows
with one fp32 absmax scale per vocabulary row for 8 and 4, never NF4: the head's output is
the logits themselves, with no later layer or adapter to absorb its error. QLoRA leaves it
unquantised for that reason (bitsandbytes / transformers skip `lm_head`); an int8 row keeps
each logit's weights within half a step of that row's absmax / 127, and the head is the
token table's twin at the output end, which 4-bit runs already keep in int8 rows.

`state_dict()` of a FrozenBaseLinear / FrozenBaseEmbedding gives the dequantised weight in
the original layout and dtype (what a plain transformers model loads), and loading one
quantises again: checkpoints, `save_pretrained` and merging see an ordinary model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bitblend.errors import BitblendError

NF4_BLOCK = 64  # weights per NF4 block (QLoRA's and torchao's default)
NF4_SCALER_BLOCK = 256  # block scales per double-quantisation block (at most)
# Adapter modules that peft adds inside the backbone (lora_A, lora_B, ...): never frozen base.
_ADAPTER_PREFIX = "lora_"


def _nf4() -> Any:
    """torchao's NF4 tensor module (the 4-bit backend)."""
    try:
        from torchao.quantization import to_nf4
    except ImportError:
        raise BitblendError(
            "precision.base_bits: 4 needs torchao (pip install torchao), or use base_bits 8"
        ) from None
    return to_nf4


def _scaler_block(n_blocks: int) -> int:
    """The largest double-quantisation block <= 256 that divides `n_blocks` (torchao needs one)."""
    for size in range(min(NF4_SCALER_BLOCK, n_blocks), 0, -1):
        if n_blocks % size == 0:
            return size
    return 1


class _DequantLinear(torch.autograd.Function):
    """y = x @ W^T + b with W dequantised in x's dtype; backward dequantises W again."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: FrozenBaseLinear) -> torch.Tensor:
        ctx.layer = layer
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return nn.functional.linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        # (…, out) @ (out, in) -> (…, in): the input gradient only; W and b are frozen.
        return grad @ ctx.layer.dequantize(grad.dtype), None


class FrozenBaseLinear(nn.Module):
    """A frozen Linear whose weight is stored in `bits` bits (see the module docstring)."""

    def __init__(self, layer: nn.Module, bits: int, transposed: bool = False) -> None:
        super().__init__()
        weight = _tensor(layer.weight).detach()
        self.bits = bits
        self.transposed = transposed  # GPT-2's Conv1D keeps W as (in, out)
        self.source_dtype = weight.dtype  # state_dict hands weights back in this dtype
        w = weight.t() if transposed else weight  # (out, in)
        self.out_features: int = w.shape[0]
        self.in_features: int = w.shape[1]
        self.weight = nn.Parameter(self._quantize(w.contiguous()), requires_grad=False)
        bias = getattr(layer, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def _quantize(self, w: torch.Tensor) -> torch.Tensor:
        """(out, in) float weight -> the stored format (sets `scale` for int8)."""
        if self.bits == 16:
            return w.to(torch.bfloat16)
        if self.bits == 8:
            # Symmetric per-row absmax: W ≈ q * scale[:, None], q in [-127, 127].
            scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
            self.register_buffer("scale", scale, persistent=False)
            return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
        n_blocks = w.numel() // NF4_BLOCK
        return _nf4()(w, NF4_BLOCK, _scaler_block(n_blocks))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The (out, in) weight in `dtype` (a fresh tensor for 8 and 4 bits)."""
        if self.bits == 8:
            return self.weight.to(dtype) * _tensor(self.scale).to(dtype)[:, None]
        return self.weight.to(dtype)  # bf16 cast, or NF4Tensor's dequantisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(…, in) -> (…, out) in the compute dtype (autocast's, else the input's)."""
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))
        with torch.autocast(device_type=device, enabled=False):
            out: torch.Tensor = _DequantLinear.apply(x, self)
        return out

    def stored_bytes(self) -> int:
        """Bytes of the stored weight (codes, scales) and bias."""
        total = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        if self.bits == 4:
            inner, _ = self.weight.__tensor_flatten__()  # type: ignore[attr-defined]
            parts = [getattr(self.weight, name) for name in inner]
            return total + sum(t.numel() * t.element_size() for t in parts)
        total += self.weight.numel() * self.weight.element_size()
        if self.bits == 8:
            total += _tensor(self.scale).numel() * _tensor(self.scale).element_size()
        return total

    # -- state_dict: the dequantised weight in the original layout ------------------------
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        w = self.dequantize(self.source_dtype)
        destination[prefix + "weight"] = w.t() if self.transposed else w
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name in ("weight", "bias"):
            key = prefix + name
            if key not in state_dict:
                if name == "weight" or self.bias is not None:
                    missing_keys.append(key)
                continue
            value = state_dict[key].to(self.source_dtype)
            with torch.no_grad():
                if name == "bias" and self.bias is not None:
                    self.bias.copy_(value)
                elif name == "weight":
                    w = value.t() if self.transposed else value
                    self.weight = nn.Parameter(
                        self._quantize(w.contiguous().to(self.weight.device)),
                        requires_grad=False,
                    )

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}"


class FrozenBaseEmbedding(nn.Module):
    """A frozen lookup table stored in bf16 (`bits` 16) or int8 rows with one fp32 absmax
    scale per row (`bits` 8 and 4: NF4 blocks have no row gather); a lookup dequantises
    only the rows it reads, into the table's original dtype."""

    def __init__(self, table: nn.Embedding, bits: int) -> None:
        super().__init__()
        weight = table.weight.detach()
        self.bits = bits
        self.source_dtype = weight.dtype
        self.num_embeddings, self.embedding_dim = table.num_embeddings, table.embedding_dim
        self.padding_idx = table.padding_idx
        self.codes = nn.Parameter(self._quantize(weight), requires_grad=False)

    def _quantize(self, w: torch.Tensor) -> torch.Tensor:
        if self.bits == 16:
            return w.to(torch.bfloat16)
        scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("scale", scale, persistent=False)
        return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Dequantise the codes `rows` (any shape) of the table: (…, dim)."""
        if self.bits == 16:
            return rows.to(self.source_dtype)
        return rows.to(self.source_dtype) * _tensor(self.scale).to(self.source_dtype)[..., None]

    @property
    def weight(self) -> torch.Tensor:
        """The whole table, dequantised (for callers that read `.weight`, e.g. its dtype)."""
        return self._rows(self.codes) if self.bits == 16 else self._dequantize_all()

    def _dequantize_all(self) -> torch.Tensor:
        return self.codes.to(self.source_dtype) * _tensor(self.scale).to(self.source_dtype)[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(…) token ids -> (…, dim) rows in the table's original dtype."""
        codes = nn.functional.embedding(ids, self.codes)
        if self.bits == 16:
            return codes.to(self.source_dtype)
        scale = nn.functional.embedding(ids, _tensor(self.scale)[:, None]).to(self.source_dtype)
        return codes.to(self.source_dtype) * scale

    def stored_bytes(self) -> int:
        """Bytes of the codes and row scales."""
        total = self.codes.numel() * self.codes.element_size()
        if self.bits != 16:
            total += _tensor(self.scale).numel() * _tensor(self.scale).element_size()
        return total

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        value = state_dict[key].to(self.source_dtype).to(self.codes.device)
        self.codes = nn.Parameter(self._quantize(value), requires_grad=False)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"


def _tensor(value: object) -> torch.Tensor:
    """`value` as a tensor (module attributes are typed Tensor | Module for mypy)."""
    assert isinstance(value, torch.Tensor)
    return value


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # transformers' GPT-2


def stored_weight_bytes(kind: str, rows: int, cols: int, bits: int, source_bytes: int = 4) -> int:
    """Bytes a frozen (rows, cols) weight takes in `bits` bits, by the formats above (bias
    aside): `kind` "linear" ((out, in): bf16, int8 + a row scale, NF4), "embedding"
    ((rows, dim)) or "head" (a frozen LM head, (vocab, width)): bf16, or int8 + a row scale
    for 8 and 4. NF4 keeps its factors, mean and
    code table in the source weight's dtype (`source_bytes` wide). The cost model's
    formula; tests check it against `stored_bytes()` of the real modules."""
    n = rows * cols
    if bits == 16:
        return 2 * n
    if bits == 8 or kind in ("embedding", "head"):
        return n + 4 * rows  # int8 codes + one fp32 absmax scale per row
    # NF4 (torchao): 4-bit codes, one int8 block scale per 64 weights, one fp32 factor per
    # double-quantisation block of those, a mean and the 16-entry code table.
    blocks = n // NF4_BLOCK
    factors = blocks // _scaler_block(blocks)
    return n // 2 + blocks + source_bytes * (factors + 1 + 16)


def base_modules(model: nn.Module, prefix: str = "backbone.") -> list[tuple[str, nn.Module]]:
    """The frozen Linear / Conv1D / Embedding layers under `prefix` that `freeze_base`
    stores in low bits: not peft's lora_* layers, not a weight shared with another module."""
    chosen = []
    for name, module in model.named_modules():
        if not name.startswith(prefix) or any(
            part.startswith(_ADAPTER_PREFIX) for part in name.split(".")
        ):
            continue
        kind = type(module) is nn.Linear or _is_conv1d(module) or type(module) is nn.Embedding
        if kind and not _tensor(module.weight).requires_grad:
            chosen.append((name, module))
    # A weight shared by two modules (an LM head tied to the token table) keeps its format
    # in both: each reads the tensor itself.
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [(n, m) for n, m in chosen if owners.get(id(m.weight), 0) == 1]


HEADS_PREFIX = "heads."  # MultiTaskModel's task heads


def head_bits(bits: int) -> int:
    """The format of a frozen LM head for `precision.base_bits` (module docstring): bf16
    for 16, int8 rows for 8 and 4."""
    return 16 if bits == 16 else 8


def frozen_heads(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The frozen Linear layers of task heads (a frozen LM head) that `freeze_base` stores
    in `head_bits`; tied ones (the token table's tensor) keep their format."""
    return [(n, m) for n, m in base_modules(model, HEADS_PREFIX) if type(m) is nn.Linear]


def freeze_base(model: nn.Module, bits: int | None, prefix: str = "backbone.") -> list[str]:
    """Store every frozen Linear / Conv1D / Embedding under `prefix` (`base_modules`) in
    `bits` bits, and every frozen head Linear (`frozen_heads`) in `head_bits(bits)`, in
    place; returns their names. A no-op for `bits` None."""
    if bits is None:
        return []
    chosen = base_modules(model, prefix)
    heads = frozen_heads(model)
    if bits == 4:
        for name, module in chosen:
            if type(module) is not nn.Embedding and _tensor(module.weight).numel() % NF4_BLOCK:
                raise BitblendError(
                    f"precision.base_bits: 4 stores weights in NF4 blocks of {NF4_BLOCK}; "
                    f"{name} has {_tensor(module.weight).numel()} weights (not a multiple): use "
                    "base_bits 8"
                )
        _nf4()
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        low: nn.Module
        if type(module) is nn.Embedding:
            low = FrozenBaseEmbedding(module, bits)
        else:
            low = FrozenBaseLinear(module, bits, transposed=_is_conv1d(module))
        setattr(parent, child, low)
    for name, module in heads:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, FrozenBaseLinear(module, head_bits(bits)))
    return [name for name, _ in chosen + heads]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: low-bit base layers count their codes and
    scales, every other parameter its elements."""
    total = 0
    low_bit: set[int] = set()
    for module in model.modules():
        if isinstance(module, FrozenBaseLinear | FrozenBaseEmbedding):
            total += module.stored_bytes()
            low_bit.update(id(p) for p in module.parameters())
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in low_bit and id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total
