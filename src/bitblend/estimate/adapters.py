"""LoRA runs (`model.adapter.kind: lora`) for the cost model: which parameters train, which
stay frozen, and what the frozen base takes at rest in `precision.base_bits`.

The model is built as `train` builds it, on the meta device (no weights, no memory): the
backbone, bitblend's heads, then peft's adapters by models/adapters.py's own `add_lora`
(same targets, same per-task adapters). The frozen layers that precision/base_weights.py
would store in 16, 8 or 4 bits are listed by its own `base_modules`, and their bytes come
from its `stored_weight_bytes` (tested against the real modules' `stored_bytes()`). A frozen
LM head (the checkpoint's, `model.adapter.train_lm_head: false`) counts as frozen base in
`head_bits`' format.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bitblend.config.schema import Recipe
from bitblend.models.adapters import TARGET_ALIASES, add_lora, checkpoint_lm_heads
from bitblend.models.trunk import MultiTaskModel
from bitblend.precision.base_weights import base_modules, stored_weight_bytes

QKV = ("query", "key", "value")


@dataclass(frozen=True)
class AdapterShape:
    """What a LoRA run trains and what it freezes (parameter counts, exact)."""

    r: int
    dropout: float  # lora dropout on each adapter's input
    base_bits: int | None  # precision.base_bits: None keeps the frozen base as the recipe does
    adapters: int  # the shared adapter plus one per `tasks[i].adapter: own`
    lora_params: int  # every lora_A and lora_B of every adapter
    frozen_params: int  # backbone parameters without gradients (norms included)
    frozen_fp32_params: int  # of those, kept in fp32 by every recipe (norms)
    # (kind, rows, cols) of each frozen weight base_bits stores in its format
    quantised: tuple[tuple[str, int, int], ...]
    # per transformer block (one adapter): sum of the wrapped layers' input widths, and
    # how many layers are wrapped; a forward runs one adapter of each wrapped layer
    lora_in_per_layer: int
    lora_layers_per_layer: int
    key_targeted: bool  # the key projection carries an adapter (its input needs gradients)
    qkv_targeted: bool  # query, key or value carries one (bitblend cannot fuse q/k/v then)
    largest_frozen: int  # elements of the largest frozen Linear weight (dequantised per use)
    # tasks whose LM head is the checkpoint's and stays frozen (model.adapter.train_lm_head
    # false): counted in frozen_params and `quantised` ("head"), no gradient or state
    frozen_heads: tuple[str, ...] = ()

    @property
    def quantised_params(self) -> int:
        """Elements stored in the base format."""
        return sum(r * c for _, r, c in self.quantised)

    def frozen_bytes(self, weight_bytes: int) -> int:
        """The frozen base at rest: low-bit formats for the layers base_bits takes, norms
        in fp32, everything else (biases, other tables) at the recipe's weight width."""
        rest = self.frozen_params - self.frozen_fp32_params
        total = self.frozen_fp32_params * 4
        if self.base_bits is None:
            return total + rest * weight_bytes
        fmt = sum(
            stored_weight_bytes(k, r, c, self.base_bits, weight_bytes) for k, r, c in self.quantised
        )
        return total + fmt + (rest - self.quantised_params) * weight_bytes


def _meta_backbone(recipe: Recipe, config: Any) -> nn.Module:
    """The backbone's modules without weights, as models/backbones.py builds them."""
    from transformers import AutoModel

    from bitblend.models.backbones import ALIASES, load_backbone_with_head

    m = recipe.model
    with torch.device("meta"):
        if m.backbone in ALIASES and m.backbone != "minilm":
            return load_backbone_with_head(
                m.backbone, None, m.dropout, m.attention_dropout, vocab_size=m.vocab_size
            )[0]
        kwargs = {"add_pooling_layer": False} if config.model_type in ("bert", "roberta") else {}
        backbone: nn.Module = AutoModel.from_config(config, **kwargs)
        return backbone


def adapter_shape(recipe: Recipe, config: Any, specs: list[Any]) -> AdapterShape | None:
    """The LoRA view of `recipe`'s model (None without `model.adapter`)."""
    cfg = recipe.model.adapter
    if cfg.kind != "lora":
        return None
    backbone = _meta_backbone(recipe, config)
    own = [t.name for t in recipe.tasks if t.adapter == "own"]
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MultiTaskModel(backbone, specs, recipe.model.pooling, recipe.model.head_dropout)
        add_lora(model, cfg, own)
    params = dict(model.backbone.named_parameters())
    # Specs of checkpoint LM heads carry lm_head (recipe_shapes), so add_lora froze them
    # as it does in train unless model.adapter.train_lm_head.
    heads = [t for t in checkpoint_lm_heads(model) if not model.heads[t].weight.requires_grad]
    lora = {n: p for n, p in params.items() if ".lora_" in n}
    frozen = {n: p for n, p in params.items() if not p.requires_grad}
    norms = {
        f"{name}.{pn}"
        for name, mod in model.backbone.named_modules()
        if isinstance(mod, nn.LayerNorm) or "norm" in type(mod).__name__.lower()
        for pn, _ in mod.named_parameters(recurse=False)
    }
    quantised: list[tuple[str, int, int]] = []
    largest = 0
    for _, mod in base_modules(model):
        w: Any = mod.weight
        if isinstance(mod, nn.Embedding):
            quantised.append(("embedding", int(w.shape[0]), int(w.shape[1])))
        else:  # (out, in); GPT-2's Conv1D stores (in, out)
            rows, cols = (w.shape[1], w.shape[0]) if type(mod).__name__ == "Conv1D" else w.shape
            quantised.append(("linear", int(rows), int(cols)))
            largest = max(largest, int(w.numel()))
    head_frozen = 0
    for task in heads:
        w = model.heads[task].weight
        quantised.append(("head", int(w.shape[0]), int(w.shape[1])))  # (vocab, width)
        head_frozen += sum(p.numel() for p in model.heads[task].parameters())
    wrapped = [
        (name, mod)
        for name, mod in model.backbone.named_modules()
        if hasattr(mod, "lora_A") and hasattr(mod, "base_layer")
    ]
    layers = max(int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 1)), 1)
    in_widths = sum(_in_features(mod) for _, mod in wrapped)
    leaves = {name.rsplit(".", 1)[-1] for name, _ in wrapped}
    return AdapterShape(
        r=cfg.r,
        dropout=cfg.dropout,
        base_bits=recipe.precision.base_bits,
        adapters=1 + len(own),
        lora_params=sum(p.numel() for p in lora.values()),
        frozen_params=sum(p.numel() for p in frozen.values()) + head_frozen,
        frozen_fp32_params=sum(p.numel() for n, p in frozen.items() if n in norms),
        quantised=tuple(quantised),
        lora_in_per_layer=in_widths // layers,
        lora_layers_per_layer=len(wrapped) // layers,
        key_targeted=bool(leaves & set(TARGET_ALIASES["key"])),  # GPT-2: c_attn is q, k, v
        qkv_targeted=bool(leaves & {a for k in QKV for a in TARGET_ALIASES[k]}),
        largest_frozen=largest,
        frozen_heads=tuple(heads),
    )


def checkpoint_lm_tasks(recipe: Recipe, config: Any) -> dict[str, str]:
    """Tasks whose LM head comes from the checkpoint, as train/setup.py finds it, with the
    transformers LM class it comes from: llama-<size> with causal_lm, or a local directory
    saved as its LM class (e.g. a LlamaForCausalLM run's model/). Such a head has the
    config's vocab_size outputs and no bias. Tied heads (GPT-2: the output matrix is the
    token table) are left out: the cost model counts their task a fresh head, as before."""
    from bitblend.models.llama import ALIASES as LLAMA_ALIASES

    if getattr(config, "tie_word_embeddings", False):
        return {}
    if recipe.model.backbone in LLAMA_ALIASES:
        return {t.name: "LlamaForCausalLM" for t in recipe.tasks if t.head == "causal_lm"}
    arches = [str(a) for a in (getattr(config, "architectures", None) or [])]
    causal = [a for a in arches if a.endswith("ForCausalLM")]
    return {t.name: causal[0] for t in recipe.tasks if t.head == "causal_lm" and causal}


def _in_features(module: nn.Module) -> int:
    """Input width of a peft-wrapped layer (Linear, or GPT-2's Conv1D: weight (in, out))."""
    base: Any = module.base_layer
    if type(base).__name__ == "Conv1D":
        return int(base.weight.shape[0])
    return int(base.in_features)
