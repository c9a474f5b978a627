"""A language-model task on a pretrained checkpoint starts from the checkpoint's own LM head.

The "pretrained" models are built here (no hub): a tiny GPT-2 trained for a few steps on BBC
News text, and a tiny random BERT-MLM, each saved with `save_pretrained` and loaded back
through bitblend as a local-path backbone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
)

from bitblend.data.builtin import load_builtin
from bitblend.models.backbones import (
    _byte_level_tokenizer,
    load_backbone_with_head,
    minilm_path,
)
from bitblend.models.packed import document_mask
from bitblend.models.trunk import HEADS_FILE, load_model
from bitblend.tasks.losses import IGNORE
from bitblend.taskspec import load_data
from bitblend.train.setup import build_model
from bitblend.train.trainer import Trainer
from tests.conftest import make_recipe


def _bbc_texts(n: int) -> list[str]:
    return [str(t) for t in load_builtin("bbc_news").train.text[:n]]


def _gpt(tmp: Path, train_steps: int) -> Path:
    """A tiny GPT-2 (tied LM head, byte-level tokenizer), trained `train_steps` on BBC News."""
    torch.manual_seed(0)
    tok = _byte_level_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    lm = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(lm.parameters(), lr=5e-3)
    texts = _bbc_texts(64)
    for step in range(train_steps):
        batch = tok(texts[step % 8 * 8 : step % 8 * 8 + 8], truncation=True, max_length=48,
                    padding=True, return_tensors="pt")  # fmt: skip
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        lm(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    lm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return tmp


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 trained 20 steps: a "pretrained" LM that knows its kind of text."""
    return _gpt(tmp_path_factory.mktemp("gpt"), 20)


@pytest.fixture(scope="module")
def random_gpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 as initialised: enough to compare logits, in well under a second."""
    return _gpt(tmp_path_factory.mktemp("gpt0"), 0)


def _clm_recipe(path: Path, *more: str) -> Any:
    return make_recipe(
        f"model.backbone={path}", "model.max_length=64", "tasks.0.head=causal_lm",
        "tasks.0.max_examples=64", "train.batch_size=4", "train.eval_batch_size=8", *more,
    )  # fmt: skip


def _hf_token_loss(lm: Any, trainer: Trainer) -> float:
    """transformers' own mean next-token loss over the eval batches bitblend evaluates."""
    task = trainer.tasks[0]
    total, count = 0.0, 0
    gen = torch.Generator().manual_seed(0)
    # The examples bitblend's evaluation covers (train.eval_max_examples); batching differs,
    # which a token-weighted mean over right-padded causal inputs does not see.
    idx = list(range(min(len(task.eval), trainer.recipe.train.eval_max_examples or 10**9)))
    for i in range(0, len(idx), task.batch.batch_size):
        batch = task.batch.collate(task.eval, idx[i : i + task.batch.batch_size], gen)
        labels = batch["labels"].masked_fill(batch["labels"] == IGNORE, -100)
        k = int((labels[:, 1:] != -100).sum())
        extra: dict[str, Any] = {"attention_mask": batch["attention_mask"]}
        if "segment_ids" in batch:  # packed rows (causal_lm's default): the same 4D mask
            extra = {"attention_mask": document_mask(batch["segment_ids"], causal=True),
                     "position_ids": batch["position_ids"]}  # fmt: skip
        with torch.no_grad():
            out = lm(input_ids=batch["input_ids"], labels=labels, **extra)
        total += float(out.loss) * k
        count += k
    return total / count


@pytest.mark.slow
def test_pretrained_causal_lm_starts_at_the_checkpoints_perplexity(
    gpt_dir: Path, tmp_path: Path
) -> None:
    trainer = Trainer(_clm_recipe(gpt_dir), tmp_path / "run", show_progress=False)
    head = trainer.model.heads["bbc"]
    # The checkpoint's tied head: its output matrix is the trunk's input embedding.
    assert head.weight is trainer.model.backbone.get_input_embeddings().weight
    assert not trainer.model.is_new_parameter("heads.bbc.weight")
    ours = trainer.evaluate()["bbc"]
    hf = AutoModelForCausalLM.from_pretrained(gpt_dir).eval()
    theirs = _hf_token_loss(hf, trainer)
    assert ours["loss"] == pytest.approx(theirs, rel=1e-4)
    assert ours["perplexity"] == pytest.approx(math.exp(theirs), rel=1e-3)
    # It is a trained model: far below the perplexity of a uniform guess over 257 bytes.
    assert ours["perplexity"] < 0.5 * len(_byte_level_tokenizer())


def test_pretrained_causal_lm_logits_equal_transformers(random_gpt_dir: Path) -> None:
    gpt_dir = random_gpt_dir
    recipe = _clm_recipe(gpt_dir)
    model, tok, _ = build_model(recipe, load_data(recipe))
    model.eval()
    hf = AutoModelForCausalLM.from_pretrained(gpt_dir).eval()
    batch = tok(_bbc_texts(3), truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model("bbc", **batch)
        theirs = hf(**batch).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_run_dir_is_the_fine_tuned_transformers_lm(gpt_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = Trainer(_clm_recipe(gpt_dir, "train.steps=2"), run, show_progress=False)
    trainer.fit()
    saved = load_file(str(run / "model" / HEADS_FILE))
    assert not [k for k in saved if k.startswith("heads.bbc.")]  # it lives in the LM checkpoint
    hf = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    model, tok, _ = load_model(run / "model")
    model.eval()
    assert model.heads["bbc"].weight is model.backbone.get_input_embeddings().weight
    batch = tok(_bbc_texts(2), truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours, theirs = model("bbc", **batch), hf(**batch).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-5, atol=1e-5)
    # Fine-tuned: the saved LM differs from the checkpoint it started from.
    start = AutoModelForCausalLM.from_pretrained(gpt_dir)
    assert not torch.equal(start.lm_head.weight, hf.lm_head.weight)


def _same_logits(model: Any, hf: Any, tok: Any, atol: float) -> None:
    batch = tok(_bbc_texts(2), truncation=True, max_length=32, padding=True, return_tensors="pt")
    batch.pop("token_type_ids", None)
    with torch.no_grad():
        ours, theirs = model("bbc", **batch), hf(**batch).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=atol, atol=atol)


def test_saved_model_dir_is_the_transformers_lm(random_gpt_dir: Path, tmp_path: Path) -> None:
    recipe = _clm_recipe(random_gpt_dir)
    model, tok, _ = build_model(recipe, load_data(recipe))
    with torch.no_grad():  # stands in for fine-tuning: the saved LM must be this one
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save(tmp_path / "model", tok)
    assert not [k for k in load_file(str(tmp_path / "model" / HEADS_FILE)) if "heads." in k]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    torch.testing.assert_close(hf.lm_head.weight, model.heads["bbc"].weight)
    again, tok2, _ = load_model(tmp_path / "model")
    assert again.heads["bbc"].weight is again.backbone.get_input_embeddings().weight
    _same_logits(again.eval(), hf, tok2, 1e-5)
    # ...and a later run can start from it as a pretrained backbone, head included.
    _, _, head = load_backbone_with_head(str(tmp_path / "model"), "causal_lm")
    assert head is not None and head.arch == "GPT2LMHeadModel"
    torch.testing.assert_close(head.module.weight, hf.lm_head.weight)


def test_pretrained_masked_lm_head_is_tied_and_equal(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64)  # fmt: skip
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    recipe = make_recipe(f"model.backbone={tmp_path / 'bert'}", "tasks.0.head=masked_lm",
                         "tasks.0.max_examples=64")  # fmt: skip
    model, _, _ = build_model(recipe, load_data(recipe))
    model.eval()
    head = model.heads["bbc"]
    assert head.predictions.decoder.weight is model.backbone.get_input_embeddings().weight
    hf = AutoModelForMaskedLM.from_pretrained(tmp_path / "bert").eval()
    _same_logits(model, hf, tok, 1e-4)
    # Saved and reloaded: one BertForMaskedLM checkpoint (untied transform + tied decoder).
    model.save(tmp_path / "model", tok)
    again, _, _ = load_model(tmp_path / "model")
    assert again.heads["bbc"].predictions.decoder.weight is (
        again.backbone.get_input_embeddings().weight
    )
    _same_logits(again.eval(), AutoModelForMaskedLM.from_pretrained(tmp_path / "model"), tok, 1e-5)


def test_minilm_has_no_mlm_head_so_masked_lm_gets_a_fresh_one() -> None:
    # MiniLM ships as a BertModel: the MLM head's transform and bias are not in it, so a
    # masked_lm task gets a fresh Linear head (docs/usage.md), trained from scratch.
    recipe = make_recipe("model.backbone=minilm", "tasks.0.head=masked_lm",
                         "tasks.0.max_examples=32")  # fmt: skip
    model, tok, _ = build_model(recipe, load_data(recipe))
    assert model.specs["bbc"].lm_head == ""
    assert isinstance(model.heads["bbc"], torch.nn.Linear)
    assert model.heads["bbc"].out_features == len(tok)
    assert model.is_new_parameter("heads.bbc.weight")
