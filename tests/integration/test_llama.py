"""The llama-<size> decoders (issue 17, item 5): a run trains a Llama (packed causal LM,
its own BPE tokenizer) into an ordinary LlamaForCausalLM directory, resumes with the stored
tokenizer, fine-tunes a local causal-LM directory through the same path, and `generate`
is deterministic with a seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from bitblend.cli import main
from bitblend.config.load import apply_overrides, recipe_from_dict
from bitblend.models.llama import TOKENIZER_DIR, llama_tokenizer
from bitblend.runs.generate import Sampling, generate
from bitblend.train.trainer import Trainer


def _recipe(backbone: str = "llama-tiny", *overrides: str) -> Any:
    data = {
        "name": "llama-test",
        "model": {"backbone": backbone, "max_length": 64, "vocab_size": 400},
        "tasks": [{"name": "news", "data": "bbc_news", "head": "causal_lm", "max_examples": 64}],
        "precision": {"recipe": "32-true"},
        "optimizer": {"name": "adamw", "lr": 3e-3},
        "train": {"steps": 6, "batch_size": 4, "eval_max_examples": 8, "threads": 2,
                  "checkpoint_every": 3},
    }  # fmt: skip
    return recipe_from_dict(apply_overrides(data, list(overrides)))


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("llama") / "run"
    Trainer(_recipe(), run, show_progress=False).fit()
    return run


@pytest.mark.slow
def test_run_saves_an_ordinary_llama_for_causal_lm(llama_run: Path) -> None:
    model_dir = llama_run / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert isinstance(hf, LlamaForCausalLM)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) <= 400 and len(tok) > 258  # BPE merges learnt from the recipe's text
    # transformers alone reproduces bitblend's logits: the directory is the trained LM.
    from bitblend.models.trunk import load_model

    ours, _, _ = load_model(model_dir)
    ours.eval()
    x = torch.tensor([tok("The market rose")["input_ids"]])
    with torch.no_grad():
        ref = hf(input_ids=x).logits
        got = ours("news", input_ids=x, attention_mask=torch.ones_like(x))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # The tokenizer was trained once and kept in the run directory.
    assert (llama_run / TOKENIZER_DIR / "tokenizer.json").is_file()


@pytest.mark.slow
def test_generate_is_deterministic_with_a_seed(llama_run: Path) -> None:
    sampled = Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    a = generate(llama_run, "The", sampled)
    b = generate(llama_run, "The", Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3))
    c = generate(llama_run, "The", Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=4))
    assert a == b
    assert a[1] != c[1]  # another seed, another sample (a 1.1M-param model, near uniform)
    greedy = Sampling(max_new_tokens=8, temperature=0.0)
    g1, g2 = generate(llama_run, "The", greedy), generate(llama_run, "The", greedy)
    assert g1 == g2
    # Greedy is the argmax of transformers' own model, token by token.
    hf = AutoModelForCausalLM.from_pretrained(llama_run / "model").eval()
    tok = AutoTokenizer.from_pretrained(llama_run / "model")
    ids = tok("The", add_special_tokens=False)["input_ids"]
    for t in g1[1]:
        with torch.no_grad():
            nxt = int(hf(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        assert nxt == t
        ids.append(t)


@pytest.mark.slow
def test_kv_cache_gives_the_tokens_of_full_recompute(llama_run: Path) -> None:
    """Decoding with past_key_values picks the same tokens as rerunning the whole context,
    greedy and sampled, also once the context outgrows the positions (cut window)."""
    from bitblend.models.sampling import sample_ids
    from bitblend.models.trunk import load_model

    model, tok, _ = load_model(llama_run / "model")
    model.float().eval()
    ids = tok("The market", add_special_tokens=False)["input_ids"]
    for sampling in (Sampling(max_new_tokens=12, temperature=0.0),
                     Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)):  # fmt: skip
        cached = sample_ids(model, "news", list(ids), sampling, None, cache=True)
        full = sample_ids(model, "news", list(ids), sampling, None, cache=False)
        assert cached == full and len(cached) == 12
    model.backbone.config.max_position_embeddings = 8  # RoPE: any window of 8 works
    greedy = Sampling(max_new_tokens=8, temperature=0.0)
    cut = sample_ids(model, "news", list(ids), greedy, None, cache=True)
    assert cut == sample_ids(model, "news", list(ids), greedy, None, cache=False)


@pytest.mark.slow
def test_run_writes_greedy_samples_and_lm_report_sections(llama_run: Path) -> None:
    """samples.json: the start of the eval document continued greedily, the very text
    `bitblend generate --temperature 0` gives; report.html shows it and per-domain
    perplexity (sections a classification run's report does not have)."""
    data = json.loads((llama_run / "samples.json").read_text())
    assert data["sampling"]["temperature"] == 0.0 and data["step"] == 6
    (sample,) = data["samples"]
    assert sample["task"] == "news" and sample["prompt"]
    text, _ = generate(llama_run, sample["prompt"], Sampling(max_new_tokens=32, temperature=0.0))
    assert sample["text"] == text
    page = (llama_run / "report.html").read_text()
    assert '<section id="perplexity"><h2>Validation perplexity per domain</h2>\n<img' in page
    assert (llama_run / "plots" / "perplexity.png").is_file()
    assert '<section id="samples"><h2>Generated samples</h2>' in page
    import html

    assert html.escape(sample["text"]) in page


@pytest.mark.slow
def test_cli_generate_and_its_bad_input(llama_run: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["generate", str(llama_run), "--prompt", "Shares", "--max-new-tokens", "5"]
    assert main([*args, "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert main([*args, "--seed", "1"]) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("Shares")
    assert main([*args, "--top-p", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--top-p" in err[0]


@pytest.mark.slow
def test_resume_reuses_the_stored_tokenizer(tmp_path: Path) -> None:
    run = tmp_path / "run"
    bf16 = ("train.steps=3", "precision.recipe=bf16-true")
    Trainer(_recipe("llama-tiny", *bf16), run, show_progress=False).fit()
    # A bf16-true run (bf16 trunk, fp32 heads on disk) samples too.
    text, ids = generate(run, "The", Sampling(max_new_tokens=4, temperature=0.0))
    assert len(ids) >= 1 and isinstance(text, str)
    # Replace the stored tokenizer with a different one: a resume must read it, not retrain.
    other = llama_tokenizer(lambda: ["zzzz yyyy"] * 50, 300)
    (run / TOKENIZER_DIR / "tokenizer.json").unlink()
    other.save_pretrained(run / TOKENIZER_DIR)
    resumed = Trainer(_recipe("llama-tiny", *bf16), run, resume=True,
                      show_progress=False)  # fmt: skip
    assert resumed.tokenizer.get_vocab() == other.get_vocab()


@pytest.mark.slow
def test_local_causal_lm_directory_fine_tunes(llama_run: Path, tmp_path: Path) -> None:
    """A run's model/ (any LlamaForCausalLM directory) is a backbone: it starts from its own
    head and tokenizer, at the loss it ended with."""
    trainer = Trainer(_recipe(str(llama_run / "model"), "train.steps=2"), tmp_path / "ft",
                      show_progress=False)  # fmt: skip
    assert trainer.model.specs["news"].lm_head == "LlamaForCausalLM"
    before = json.loads((llama_run / "eval.json").read_text())["tasks"]["news"]["loss"]
    start = trainer.evaluate()["news"]["loss"]
    assert start == pytest.approx(before, rel=1e-4)
    trainer.fit()
    assert (tmp_path / "ft" / "model" / "config.json").is_file()


# Bad input (a vocabulary below the special tokens, max_length past 2048 positions, generate's
# options): tests/error_catalogue.py cases train-llama-vocab, train-llama-positions,
# generate-no-causal-task, generate-top-p.
