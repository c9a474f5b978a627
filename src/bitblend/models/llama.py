"""The `llama-<size>` backbones: transformers' Llama classes (RMSNorm, SwiGLU, RoPE,
grouped-query attention) at 15M-125M parameters, with a byte-level BPE tokenizer trained on
the recipe's own text by the `tokenizers` library.

The model is a LlamaForCausalLM split into its base model (the trunk) and its `lm_head`
(the causal_lm task's head), so a run's model/ directory is an ordinary LlamaForCausalLM
checkpoint that transformers loads without bitblend. The tokenizer is trained once; the
trainer stores it in the run directory (`tokenizer/`) and a resumed run reuses that copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bitblend.errors import BitblendError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)
BYTE_ALPHABET = 256  # the byte-level pre-tokenizer's base symbols
TOKENIZER_DIR = "tokenizer"  # inside the run directory
MAX_POSITIONS = 2048


@dataclass(frozen=True)
class LlamaSize:
    """Shape of one size; parameter counts are at the default 8192-token vocabulary."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


# SwiGLU's intermediate width ~ 8/3 x hidden (rounded to a multiple of 128), as Llama does;
# head dim 64; kv heads a divisor of heads (grouped-query attention).
SIZES: dict[str, LlamaSize] = {
    "15m": LlamaSize(hidden=256, layers=14, heads=4, kv_heads=2, intermediate=768),
    "30m": LlamaSize(hidden=384, layers=16, heads=6, kv_heads=2, intermediate=1024),
    "60m": LlamaSize(hidden=512, layers=18, heads=8, kv_heads=4, intermediate=1408),
    "125m": LlamaSize(hidden=768, layers=18, heads=12, kv_heads=4, intermediate=2048),
}
# Tests and smoke runs: 2 layers of width 64.
SIZES["tiny"] = LlamaSize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
ALIASES = tuple(f"llama-{s}" for s in SIZES)


def is_llama_alias(name: str) -> bool:
    """Whether `model.backbone` names one of the llama-<size> models."""
    return name in ALIASES


def _train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on `texts` (every string encodes: the 256 bytes are in the vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=EOS
    )


TOKENIZER_CHARS_PER_TASK = 4_000_000  # BPE statistics settle long before this; bounds the time


def tokenizer_corpus(columns: list[list[Any]]) -> Iterator[str]:
    """The text the BPE is trained on: each task's training texts in order, at most
    TOKENIZER_CHARS_PER_TASK characters of each, so every domain (the small ones too) is in
    the vocabulary and a huge task does not make training slow."""
    for texts in columns:
        budget = TOKENIZER_CHARS_PER_TASK
        for t in texts:
            text = str(t)
            if budget <= 0:
                break
            budget -= len(text)
            yield text


def check_vocab(vocab_size: int) -> None:
    """The vocabulary must hold the 256 bytes and the special tokens."""
    least = BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size < least:
        raise BitblendError(
            f"model.vocab_size: {vocab_size} is smaller than the {BYTE_ALPHABET} byte tokens "
            f"plus {len(SPECIAL_TOKENS)} special tokens of the byte-level BPE; expected at "
            f"least {least}"
        )


def llama_tokenizer(
    texts: Callable[[], Iterable[str]] | None, vocab_size: int, saved: Path | None = None
) -> PreTrainedTokenizerFast:
    """The run's tokenizer: the copy in `saved` when there is one (resume), else trained on
    `texts` (the recipe's training text), else (no text: cost estimates) untrained bytes."""
    check_vocab(vocab_size)
    if saved is not None and (saved / "tokenizer.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(saved)
    else:
        tok = _train_bpe(texts() if texts is not None else [], vocab_size)
    tok.model_max_length = MAX_POSITIONS
    tok.bitblend_trained = True  # the trainer stores it in the run directory
    return tok


def llama_config(size: str, vocab_size: int, tokenizer: Any, dropout: float, attn: str) -> Any:
    """LlamaConfig of `size`; the embedding table has `vocab_size` rows (at least the
    tokenizer's length: a small corpus may stop BPE before the asked vocabulary)."""
    s = SIZES[size]
    return LlamaConfig(
        vocab_size=max(vocab_size, len(tokenizer)),
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        attention_dropout=dropout,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=attn,  # type: ignore[call-arg]
    )


def build_llama(
    name: str,
    attention_dropout: float | None,
    attn: str,
    vocab_size: int,
    texts: Callable[[], Iterable[str]] | None,
    saved_tokenizer: Path | None,
) -> tuple[nn.Module, PreTrainedTokenizerFast, tuple[str, nn.Module]]:
    """(LlamaModel, tokenizer, ("LlamaForCausalLM", its lm_head)), seeded by the caller."""
    tokenizer = llama_tokenizer(texts, vocab_size, saved_tokenizer)
    size = name.removeprefix("llama-")
    config = llama_config(size, vocab_size, tokenizer, attention_dropout or 0.0, attn)
    lm = LlamaForCausalLM(config)
    return lm.model, tokenizer, ("LlamaForCausalLM", lm.lm_head)


def save_trained_tokenizer(tokenizer: Any, run_dir: Path) -> None:
    """Store a llama tokenizer in the run directory once (resume reads it back)."""
    target = run_dir / TOKENIZER_DIR
    if getattr(tokenizer, "bitblend_trained", False) and not target.exists():
        tokenizer.save_pretrained(target)


def parameter_count(size: str, vocab_size: int = 8192) -> int:
    """Parameters of llama-<size> (embeddings and untied head included), from its config."""
    tok = _SizedTokenizer(vocab_size)
    with torch.device("meta"):
        lm = LlamaForCausalLM(llama_config(size, vocab_size, tok, 0.0, "sdpa"))
    return sum(p.numel() for p in lm.parameters())


class _SizedTokenizer:
    """Just enough of a tokenizer for `llama_config` (length and special ids)."""

    bos_token_id = eos_token_id = 0
    pad_token_id = 1

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n
