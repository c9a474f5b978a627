"""A WordPiece vocabulary trained on a task's own text at load time (well under a second).

For text the backbone's vocabulary does not cover: MiniLM's English WordPiece turns ~64% of
Chinese review characters into [UNK]; a vocabulary trained on the reviews themselves does not.

Determinism matters here: the vocabulary is retrained whenever a run is set up (also on
resume), so the same texts must give the same token ids. `tokenizers`' WordPieceTrainer is
not deterministic on its own (huggingface/tokenizers#1794, 0.23 included): it creates the
`##x` continuing-subword tokens in hash-map order, and those ids break ties between equally
frequent merges, so two runs can differ in ids and even in tokens. We therefore hand the
trainer every `##x` it will need, sorted, ahead of training (as special tokens, the one
way to fix ids up front), and rebuild the tokenizer from the resulting plain vocabulary.
"""

from __future__ import annotations

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4, [PAD] = 0
PREFIX = "##"


def _pipeline(model: models.Model) -> Tokenizer:
    """A BERT-style tokenizer around `model`: normalise, split words, decode WordPieces."""
    tok = Tokenizer(model)
    # handle_chinese_chars puts spaces around every CJK character, so each is its own word.
    tok.normalizer = normalizers.BertNormalizer(handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix=PREFIX)
    return tok


def _continuing_tokens(texts: list[str]) -> list[str]:
    """Sorted `##c` for every character that occurs inside a word (not at its start).

    A first trainer pass that stops before any merge (vocab_size=1) has already made every
    `##c` it needs; this is exact by construction and faster than pre-tokenising in Python.
    """
    probe = _pipeline(models.WordPiece(unk_token="[UNK]"))
    trainer = trainers.WordPieceTrainer(
        vocab_size=1, special_tokens=SPECIALS, continuing_subword_prefix=PREFIX, show_progress=False
    )
    probe.train_from_iterator(texts, trainer=trainer)
    single = len(PREFIX) + 1
    return sorted(t for t in probe.get_vocab() if t.startswith(PREFIX) and len(t) == single)


def train_wordpiece(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A deterministic BERT-style WordPiece tokenizer ([CLS] text [SEP]) trained on `texts`."""
    tok = _pipeline(models.WordPiece(unk_token="[UNK]"))
    # Passed as "special" tokens only so that their ids are fixed before training; the
    # tokenizer is rebuilt below from the plain vocabulary, where they are ordinary tokens.
    seeded = SPECIALS + _continuing_tokens(texts)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=seeded,
        continuing_subword_prefix=PREFIX,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    vocab = tok.get_vocab(with_added_tokens=False)
    final = _pipeline(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    final.add_special_tokens(SPECIALS)
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    final.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=final,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def unk_rate(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> float:
    """Share of [UNK] among the tokens produced for `texts` (special tokens excluded)."""
    unk = tokenizer.unk_token_id
    total = hits = 0
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        total += len(ids)
        hits += sum(1 for i in ids if i == unk)
    return hits / max(total, 1)
