"""What the model is, for the cost model: sizes from its config and the recipe, no weights.

The backbone config comes from config.json (MiniLM, local directories) or from the tiny
aliases built on the meta device; heads come from the recipe's data exactly as `train`
builds them (trunk.py's MultiTaskModel), so the parameter count is exact and bad data fails
with train's one-line errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import torch

from bitblend.config.schema import Recipe
from bitblend.errors import BitblendError
from bitblend.estimate.adapters import AdapterShape, adapter_shape, checkpoint_lm_tasks
from bitblend.models.attention import resolve_dropouts
from bitblend.models.features import PERIODIC_FREQUENCIES, PIECEWISE_BINS
from bitblend.taskspec import head_spec, load_data

BERT_LIKE = ("bert", "roberta", "xlm-roberta")
LM_HEADS = ("masked_lm", "causal_lm")


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know about a model: its sizes, not its weights."""

    family: str  # "bert" (post-LN encoder), "gpt2" / "llama" (pre-LN decoders) or "generic"
    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    positions: int  # longest sequence the position embeddings allow
    act: str  # the MLP activation: "gelu" saves 2 (T, inter) tensors, "gelu_new" 5
    hidden_dropout: float
    attn_dropout: float
    trunk_params: int  # the backbone, exact
    head_params: int  # task heads, modality adapters, modality-type embedding
    fp32_params: int  # kept in fp32 by low-precision recipes: norms and pooled heads
    matmul_params: int  # weights + biases of Linear layers run under autocast (trunk, LM heads)
    layer_params: int  # one transformer block (the unit FSDP2 shards and gathers)
    kernels: str = "auto"  # model.kernels: bitblend's CPU attention/dropout, or torch's
    # Own-vocabulary (tokenizer: wordpiece) text embedding tables: an input embedding, not a
    # head, so they are counted apart from head_params (a 3M-parameter table is no "head").
    own_embedding_params: int = 0
    # model.adapter: LoRA over a frozen backbone (estimate/adapters.py); None trains it all
    adapter: AdapterShape | None = None
    # Heads-side input layers that train (own-vocabulary tables, patch / feature adapters):
    # with them the embeddings' output needs gradients even over a frozen backbone.
    trainable_inputs: bool = False
    # Key/value heads (grouped-query attention, Llama); 0: as many as query heads.
    kv_heads: int = 0
    # Trainable parameters no step ever gives a gradient (so no gradient and no optimizer
    # state): the backbone's token table when no task feeds it input ids (idle_table_params).
    idle_params: int = 0

    @property
    def params(self) -> int:
        """Every parameter of the model."""
        lora = self.adapter.lora_params if self.adapter else 0
        return self.trunk_params + self.head_params + self.own_embedding_params + lora

    @property
    def trainable(self) -> tuple[int, int]:
        """(parameters with gradients, of those kept in fp32): all of them, or without
        the frozen backbone of a LoRA run."""
        if self.adapter is None:
            return self.params, self.fp32_params
        ad = self.adapter
        return self.params - ad.frozen_params, self.fp32_params - ad.frozen_fp32_params

    @property
    def causal(self) -> bool:
        """Decoder (GPT-style) models."""
        return self.family in ("gpt2", "llama")


@dataclass(frozen=True)
class TaskShape:
    """One task's step: which head, how many examples of how many tokens."""

    name: str
    head: str  # bitblend head name: classification, ..., masked_lm, causal_lm
    outputs: int  # classes, or vocabulary size for LM heads
    batch: int  # examples per micro-batch
    seq: int  # tokens per example, padding included (the worst case: max_length)
    eval_examples: int = 0  # examples one evaluation reads (train.eval_max_examples caps it)
    train_examples: int = 0  # training examples (train.epochs counts passes over them)

    @property
    def tokens(self) -> int:
        """Token positions per micro-batch."""
        return self.batch * self.seq

    @property
    def per_token(self) -> bool:
        """Heads that predict at every position (the logits are (batch, seq, outputs))."""
        return self.head in ("token_classification", "masked_lm", "causal_lm")


def _get(config: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` the config sets (configs name the same size differently)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def head_params(specs: list[Any], width: int) -> tuple[int, int, int]:
    """(all, fp32-kept, autocast-matmul) parameters of heads and adapters (trunk.py's
    MultiTaskModel: a Linear head per task, patch/feature/text adapters, modality table)."""
    total = fp32 = matmul = 0
    for s in specs:
        # A checkpoint's untied LM head (Llama's lm_head) has no bias; bitblend's own do.
        head = width * s.num_outputs + (0 if s.lm_head else s.num_outputs)
        total += head
        if s.head in LM_HEADS:
            matmul += head  # LM heads run in the compute dtype
        else:
            fp32 += head  # pooled and token-classification heads stay fp32
        if "image" in s.modalities:
            proj = s.patch_dim * width + width
            total += proj + max(1, s.num_patches) * width
            matmul += proj
        if "tabular" in s.modalities:
            kind = getattr(s, "feature_embedding", "linear")
            d = {"periodic": 2 * PERIODIC_FREQUENCIES, "piecewise": PIECEWISE_BINS}.get(kind, 1)
            tab = s.num_features * (d * width + width)  # per-feature Linear(d -> width)
            if kind == "periodic":
                tab += s.num_features * PERIODIC_FREQUENCIES  # the frequencies
            total += tab
            if kind != "linear":
                fp32 += tab  # kept in fp32 (MultiTaskModel.fp32_module_names)
        if "audio" in s.modalities:  # spectrogram patch projection, its norm, positions
            proj = s.patch_frames * s.patch_mels * width + width
            total += proj + 2 * width + s.audio_patches * width
            matmul += proj
        if s.text_vocab:
            total += s.text_vocab * width
    if any(s.uses_embeds for s in specs):
        # modality-type embedding: text, image, tabular (+ audio when a task has it)
        total += (4 if any("audio" in s.modalities for s in specs) else 3) * width
    return total, fp32, matmul


def shape_from_config(
    config: Any,
    specs: list[Any],
    dropout: float | None = None,
    attention_dropout: float | None = None,
    kernels: str = "auto",
) -> ModelShape:
    """The cost-model view of a transformers config plus bitblend's heads."""
    known = (*BERT_LIKE, "gpt2", "llama")
    family = config.model_type if config.model_type in known else "generic"
    family = "bert" if family in BERT_LIKE else family
    h = int(_get(config, "hidden_size", "n_embd", "d_model"))
    L = int(_get(config, "num_hidden_layers", "n_layer", "num_layers"))
    nh = int(_get(config, "num_attention_heads", "n_head"))
    i = int(_get(config, "intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * h)
    V = int(config.vocab_size)
    P = int(_get(config, "max_position_embeddings", "n_positions", default=0))
    act = str(_get(config, "hidden_act", "activation_function", default="gelu"))
    p_hidden = float(_get(config, "hidden_dropout_prob", "resid_pdrop", "dropout", default=0.0))
    p_attn = float(
        _get(config, "attention_probs_dropout_prob", "attn_pdrop", "attention_dropout", default=0)
    )
    p_hidden, p_attn = resolve_dropouts(p_hidden, p_attn, dropout, attention_dropout)
    # Linear weights + biases of one block: q, k, v, output (or GPT-2's fused c_attn and
    # c_proj: the same sizes) and the two MLP projections.
    linears = 4 * (h * h + h) + (h * i + i) + (i * h + h)
    norms = 2 * 2 * h
    if family == "llama":
        linears, norms = llama_block_params(config)
    layer = linears + norms
    if family == "bert":
        types = int(_get(config, "type_vocab_size", default=0))
        trunk = V * h + P * h + types * h + 2 * h + L * layer
        trunk_norms = 2 * h + L * norms
    elif family == "gpt2":
        trunk = V * h + P * h + L * layer + 2 * h  # wte, wpe, blocks, ln_f
        trunk_norms = L * norms + 2 * h
    else:
        trunk = _count_on_meta(config)
        trunk_norms = L * norms + (h if family == "llama" else 0)  # llama's final RMSNorm
    heads, heads_fp32, heads_matmul = head_params(specs, h)
    own = sum(s.text_vocab * h for s in specs if s.text_vocab)
    return ModelShape(
        family=family,
        vocab=V,
        hidden=h,
        layers=L,
        heads=nh,
        intermediate=i,
        positions=P,
        act="gelu_new" if act == "gelu_new" else "gelu",
        hidden_dropout=p_hidden,
        attn_dropout=p_attn,
        trunk_params=trunk,
        head_params=heads - own,
        own_embedding_params=own,
        fp32_params=trunk_norms + heads_fp32,
        matmul_params=L * linears + heads_matmul,
        layer_params=layer,
        kernels=kernels,
        trainable_inputs=any(
            s.text_vocab or "image" in s.modalities or "tabular" in s.modalities for s in specs
        ),
        kv_heads=int(_get(config, "num_key_value_heads", default=0) or 0),
    )


def llama_block_params(config: Any) -> tuple[int, int]:
    """(Linear, norm) parameters of one Llama block: q and o (h x h), k and v (h x kv
    width: grouped-query attention), SwiGLU's gate, up and down (h x i each), no biases;
    two RMSNorm weights (h each)."""
    h, i = int(config.hidden_size), int(config.intermediate_size)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    bias = bool(getattr(config, "attention_bias", False))
    attn = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    attn += (2 * heads * head_dim + 2 * kv * head_dim) * bias  # q, o, k, v biases if any
    mlp = 3 * h * i + (2 * i + h) * bool(getattr(config, "mlp_bias", False))
    return attn + mlp, 2 * h


def idle_table_params(shape: ModelShape, specs: list[Any], own: list[bool]) -> int:
    """The backbone's token-embedding table (vocab x width) when no task reads the backbone's
    tokenizer: every text task has its own vocabulary (models/trunk.py embeds it with the
    task's own table) and the other modalities go in as embeddings. The table then never
    gets a gradient, and AdamW keeps no state for it: for MiniLM under an own-vocabulary
    task, 11.7M of 25.6M parameters (135 MiB of gradients and fp32 states). A LoRA base is
    frozen anyway (no gradients counted)."""
    feeds_table = any("text" in s.modalities and not o for s, o in zip(specs, own, strict=True))
    if feeds_table or shape.adapter is not None or shape.family == "generic":
        return 0
    return shape.vocab * shape.hidden


def _count_on_meta(config: Any) -> int:
    """Parameters of an architecture without a formula here: built on the meta device."""
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


class _SizedVocab:
    """Stands in for a WordPiece tokenizer not trained yet: only its size is needed."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def backbone_config(
    name: str,
    dropout: float | None,
    attention_dropout: float | None = None,
    vocab_size: int = 8192,
) -> tuple[Any, Any]:
    """(transformers config, tokenizer) of a backbone alias or directory, without weights;
    `vocab_size` is model.vocab_size (llama-<size>: its token table and LM head rows)."""
    from transformers import AutoConfig, AutoTokenizer

    from bitblend.models.backbones import ALIASES, load_backbone_with_head, minilm_path

    if name in ALIASES and name != "minilm":
        # The tiny models are defined in code: build them on the meta device (no memory,
        # no init) and read their config.
        with torch.device("meta"):
            model, tokenizer, _ = load_backbone_with_head(
                name, None, dropout, attention_dropout, vocab_size=vocab_size
            )
        return model.config, tokenizer
    path = minilm_path() if name == "minilm" else Path(name)
    if not (path / "config.json").is_file():
        if name != "minilm" and not path.exists():
            raise BitblendError(
                f"model.backbone: {name}: expected one of {', '.join(ALIASES)} or an existing "
                "local model directory"
            )
        raise BitblendError(
            f"model.backbone: {path}: expected minilm, tiny-bert, tiny-gpt or a transformers "
            "model directory with config.json"
        )
    try:
        return AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise BitblendError(f"model.backbone: {path}: cannot load ({exc})") from None


def recipe_shapes(
    recipe: Recipe, datas: list[Any] | None = None
) -> tuple[ModelShape, list[TaskShape], list[float]]:
    """Model shape, each task's worst-case micro-batch and the tasks' target shares.

    Loads the recipe's data as `train` does (its labels decide the heads), so bad data
    fails with train's one-line errors; `datas` is that data when the caller has it.
    """
    from bitblend.data.mixture import base_shares
    from bitblend.models.backbones import is_decoder

    datas = load_data(recipe) if datas is None else datas
    m = recipe.model
    config, tokenizer = backbone_config(m.backbone, m.dropout, m.attention_dropout, m.vocab_size)
    decoder = is_decoder(cast(Any, SimpleNamespace(config=config)))
    cfg = recipe.train
    lm_tasks = checkpoint_lm_tasks(recipe, config)
    specs, tasks, owns = [], [], []
    for i, (task, data) in enumerate(zip(recipe.tasks, datas, strict=True)):
        # The same checks, with the same words, as train/setup.py's build_model/build_tasks.
        if task.head == "causal_lm" and not decoder:
            raise BitblendError(
                f"tasks[{i}].head: causal_lm needs a decoder backbone (tiny-gpt or a GPT-style "
                f"model), {recipe.model.backbone} is bidirectional"
            )
        if task.head == "masked_lm" and decoder:
            raise BitblendError(
                f"tasks[{i}].head: masked_lm needs an encoder backbone, "
                f"{recipe.model.backbone} is causal"
            )
        own = task.tokenizer == "wordpiece" and data.train.text is not None
        tok = _SizedVocab(task.wordpiece_vocab) if own else tokenizer
        uses_text = data.train.text is not None
        spec = head_spec(task, data, tok if uses_text else None, own, i)
        if task.name in lm_tasks and not own:  # the checkpoint's head, as train/setup.py
            spec.lm_head, spec.num_outputs = lm_tasks[task.name], int(config.vocab_size)
        specs.append(spec)
        owns.append(own)
        micro = task.batch_size or cfg.batch_size
        if len(data.train) < micro * cfg.grad_accum:
            raise BitblendError(
                f"tasks[{i}]: {len(data.train)} training examples is fewer than one batch of "
                f"{micro * cfg.grad_accum} (batch_size x train.grad_accum)"
            )
        seq = 0
        if uses_text:
            longest = task.max_length or recipe.model.max_length
            seq += math.ceil(longest / cfg.pad_to_multiple_of) * cfg.pad_to_multiple_of
        seq += spec.num_patches + spec.num_features + spec.audio_patches
        cap = cfg.eval_max_examples
        evals = min(len(data.eval), cap) if cap is not None else len(data.eval)
        tasks.append(
            TaskShape(
                task.name, task.head, spec.num_outputs, micro, max(seq, 1), evals, len(data.train)
            )
        )
    shape = shape_from_config(config, specs, m.dropout, m.attention_dropout, m.kernels)
    if m.adapter.kind != "none":
        shape = replace(shape, adapter=adapter_shape(recipe, config, specs))
    shape = replace(shape, idle_params=idle_table_params(shape, specs, owns))
    for i, t in enumerate(tasks):
        if shape.positions and t.seq > shape.positions and shape.family != "generic":
            raise BitblendError(
                f"tasks[{i}]: {t.seq} tokens per example (max_length, patches and features) "
                f"exceed the {shape.positions} position embeddings of {recipe.model.backbone}; "
                "lower model.max_length (or the task's max_length)"
            )
    shares = base_shares(recipe.mixing, [t.name for t in tasks], [len(d.train) for d in datas])
    return shape, tasks, shares
