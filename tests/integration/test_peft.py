"""LoRA runs end to end: bit-exact resume from adapter-only checkpoints, the run directory
(base + peft adapter/), eval / predict on it, and `merge --method lora-merge`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bitblend.config.load import read_yaml, recipe_from_dict
from bitblend.ensemble.merge import MergeOptions, run_merge
from bitblend.models.adapters import peft_model
from bitblend.precision.base_weights import FrozenBaseLinear
from bitblend.runs.load import load_run
from bitblend.runs.transformer import TransformerRun
from bitblend.train.trainer import Trainer
from tests.conftest import make_recipe
from tests.integration.test_trainer import _losses, _train, _weights
from tests.unit.test_cli_errors import assert_one_line_error, run_cli

pytestmark = pytest.mark.slow  # every test here trains a (tiny) model

LORA = ("model.adapter.kind=lora", "model.adapter.r=4", "model.adapter.alpha=8")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Trainer]:
    """tiny-bert, LoRA on query/value over an NF4 base, bf16-mixed, 6 steps."""
    run = tmp_path_factory.mktemp("lora") / "run"
    recipe = make_recipe(*LORA, "precision.recipe=bf16-mixed", "precision.base_bits=4",
                         "train.steps=6", "train.eval_max_examples=16")  # fmt: skip
    return run, _train(recipe, run)


@pytest.mark.parametrize(("precision", "bits"), [("bf16-mixed", "4"), ("bf16-true", "8")])
def test_lora_resume_equals_straight_run_bitwise(tmp_path: Path, precision: str, bits: str) -> None:
    """Adapter-only checkpoints (no frozen base inside) still resume bit for bit."""
    recipe = make_recipe(
        *LORA,
        f"precision.recipe={precision}",
        f"precision.base_bits={bits}",
        "train.steps=6",
        "train.checkpoint_every=3",
        "train.keep_checkpoints=0",
        "train.eval_max_examples=16",
    )
    straight = tmp_path / "straight"
    trainer = _train(recipe, straight)
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    for name in ("model", "checkpoints/step-6"):
        shutil.rmtree(cut / name)
    for name in ("eval.json", "summary.json"):
        (cut / name).unlink()
    Trainer(recipe_from_dict(read_yaml(cut / "recipe.yaml")), cut, resume=True,
            show_progress=False).fit()  # fmt: skip
    a, b = _losses(straight), _losses(cut)
    assert [a[s] for s in range(4, 7)] == [b[s] for s in range(4, 7)]
    wa, wb = _weights(straight, 6), _weights(cut, 6)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(wa) == set(wb) == trainable  # adapters + heads only, never the frozen base
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    sa = load_file(str(straight / "checkpoints/step-6/state.safetensors"))
    sb = load_file(str(cut / "checkpoints/step-6/state.safetensors"))
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _outputs(run: TransformerRun, n: int = 24) -> np.ndarray:
    table, _ = run.eval_split("bbc")
    return run.outputs("bbc", table.take(np.arange(n)))


def test_run_directory_holds_the_base_and_a_peft_adapter(lora_run: tuple[Path, Trainer]) -> None:
    from transformers import AutoModel

    from peft import PeftModel

    run, _ = lora_run
    model_dir = run / "model"
    meta = json.loads((model_dir / "bitblend.json").read_text())
    assert meta["adapter"]["kind"] == "lora" and meta["adapter"]["r"] == 4
    config = json.loads((model_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["query", "value"]
    # model/ alone is a plain transformers model (the dequantised frozen base) ...
    base = AutoModel.from_pretrained(model_dir, add_pooling_layer=False)
    assert not any("lora" in k or "base_layer" in k for k in base.state_dict())
    # ... and peft puts the saved adapter on it.
    wrapped = PeftModel.from_pretrained(base, str(model_dir / "adapter"))
    saved = {k: v for k, v in wrapped.state_dict().items() if "lora_B" in k}
    assert saved and all(v.abs().sum() > 0 for v in saved.values())  # trained B, not zeros
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"]["base_bits"] == 4
    # Frozen NF4 base without grads or moments: far below a full fine-tune's 16 bytes.
    assert summary["model_state_bytes_per_param"] < 4.5


def test_load_run_reproduces_the_trained_adapter_model(lora_run: tuple[Path, Trainer]) -> None:
    run, trainer = lora_run
    loaded = load_run(run)
    assert isinstance(loaded, TransformerRun)
    trainer.model.eval()
    live = TransformerRun(run, trainer.recipe, trainer.model, trainer.tokenizer,
                          trainer.task_tokenizers, trainer.precision, trainer.device)  # fmt: skip
    # The reloaded base is quantised again from its dequantised values (torchao re-derives
    # NF4's double-quantised block scales: close, not bit-equal); bf16 matmuls on top.
    np.testing.assert_allclose(_outputs(loaded), _outputs(live), atol=2e-2, rtol=0)


def test_eval_and_predict_on_an_adapter_run(
    lora_run: tuple[Path, Trainer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = lora_run
    code, out, err = run_cli(["eval", str(run), "--json"], capsys)
    assert code == 0, err
    assert 0.0 <= json.loads(out)["bbc"]["accuracy"] <= 1.0
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "shares fell on the stock market"}\n{"text": "the team won"}\n')
    for serving in ("run", "fp32", "bf16", "int8"):
        argv = ["predict", str(run), "--input", str(inp), "--precision", serving]
        code, out, err = run_cli(argv, capsys)
        assert code == 0, (serving, err)
        assert len(out.splitlines()) == 2, serving


def test_lora_merge_equals_the_adapter_model(
    lora_run: tuple[Path, Trainer], tmp_path: Path
) -> None:
    run, _ = lora_run
    out = tmp_path / "merged"
    run_merge([run], MergeOptions("lora-merge"), out)
    assert not (out / "model" / "adapter").exists()
    merged = load_run(out, serving="fp32")
    assert isinstance(merged, TransformerRun)
    assert merged.recipe.model.adapter.kind == "none" and merged.recipe.precision.base_bits is None
    # Served in fp32 (no base_bits: the saved, dequantised base as is): W x + s B A x vs
    # (W + s B A) x, equal to float rounding.
    adapter = load_run(run, serving="fp32")
    np.testing.assert_allclose(_outputs(merged), _outputs(adapter), atol=1e-4, rtol=1e-4)


def test_weight_merges_refuse_an_adapter_run(
    lora_run: tuple[Path, Trainer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = lora_run
    code, _, err = run_cli(["merge", str(run), str(run), "--out", str(tmp_path / "m")], capsys)
    assert_one_line_error(code, err, "LoRA adapter run", "--method lora-merge")
    assert not (tmp_path / "m").exists()


def test_lora_merge_of_a_full_run_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = tmp_path / "full"
    _train(make_recipe("train.steps=1", "train.eval_max_examples=8"), full)
    capsys.readouterr()  # the training run's console output
    argv = ["merge", str(full), "--method", "lora-merge", "--out", str(tmp_path / "m")]
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, "model.adapter.kind lora")


def test_two_tasks_with_own_adapters_save_reload_and_route(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """tasks[1].adapter: own trains its own adapter; the run saves both in peft's layout,
    reloads with the same routing, and lora-merge refuses it naming the key."""
    from bitblend.config.load import apply_overrides
    from tests.conftest import tiny_recipe_dict

    data = tiny_recipe_dict()
    data["tasks"] = [
        {"name": "topic", "data": "bbc_news", "max_examples": 128},
        {"name": "topic2", "data": "bbc_news", "max_examples": 128, "adapter": "own"},
    ]
    recipe = recipe_from_dict(apply_overrides(data, [*LORA, "train.steps=6",
                                                     "train.eval_max_examples=16"]))  # fmt: skip
    run = tmp_path / "run"
    trainer = _train(recipe, run)
    assert (run / "model" / "adapter" / "task_topic2" / "adapter_config.json").is_file()
    weights = _weights(run, 6)
    own = [k for k in weights if ".task_topic2." in k and "lora_B" in k]
    shared = [k for k in weights if ".default." in k and "lora_B" in k]
    assert own and shared
    assert all(weights[k].abs().sum() > 0 for k in own + shared)  # both trained
    trainer.model.eval()
    live = TransformerRun(run, trainer.recipe, trainer.model, trainer.tokenizer,
                          trainer.task_tokenizers, trainer.precision, trainer.device)  # fmt: skip
    loaded = load_run(run)
    assert isinstance(loaded, TransformerRun)
    table, _ = loaded.eval_split("topic")
    table = table.take(np.arange(16))
    for task in ("topic", "topic2"):
        np.testing.assert_allclose(loaded.outputs(task, table), live.outputs(task, table),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    # Each task through its own head and adapter: the two differ on the same inputs.
    assert not np.allclose(loaded.outputs("topic", table), loaded.outputs("topic2", table))
    capsys.readouterr()
    argv = ["merge", str(run), "--method", "lora-merge", "--out", str(tmp_path / "m")]
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, "tasks[1].adapter: own", "adapter: shared")


def test_gpt2_conv1d_adapter_run_reloads_and_merges(tmp_path: Path) -> None:
    """tiny-gpt (GPT-2: Conv1D layers, fused c_attn) with LoRA over an NF4 base: the saved
    base keeps Conv1D's (in, out) layout, reloads to the trained outputs, and lora-merge
    equals it."""
    recipe = make_recipe(*LORA, "model.backbone=tiny-gpt", "precision.recipe=32-true",
                         "precision.base_bits=4", "train.steps=3",
                         "train.eval_max_examples=8")  # fmt: skip
    run = tmp_path / "run"
    trainer = _train(recipe, run)
    trainer.model.eval()
    live = TransformerRun(run, trainer.recipe, trainer.model, trainer.tokenizer,
                          trainer.task_tokenizers, trainer.precision, trainer.device)  # fmt: skip
    loaded = load_run(run)
    assert isinstance(loaded, TransformerRun)
    # Reloading quantises the saved (dequantised) base to NF4 again; torchao re-derives the
    # double-quantised block scales from them (a new mean and range per scaler block), which
    # moves the logits by up to ~1e-3 of their size here.
    np.testing.assert_allclose(_outputs(loaded, 8), _outputs(live, 8), atol=2e-3, rtol=0)
    out = tmp_path / "merged"
    run_merge([run], MergeOptions("lora-merge"), out)
    merged = load_run(out, serving="fp32")
    assert isinstance(merged, TransformerRun)
    # The merged model folds the adapter into the saved base itself (no re-quantisation):
    # it equals the trained model to float rounding.
    np.testing.assert_allclose(_outputs(merged, 8), _outputs(live, 8), atol=1e-4, rtol=1e-4)


def test_fp32_serving_of_an_nf4_run_uses_the_saved_weights(lora_run: tuple[Path, Trainer]) -> None:
    run, _ = lora_run
    assert load_run(run).precision.describe()["base_bits"] == 4  # "run": the training format
    fp32 = load_run(run, serving="fp32")
    assert isinstance(fp32, TransformerRun)
    assert fp32.precision.describe()["base_bits"] is None
    assert not any("FrozenBase" in type(m).__name__ for m in fp32.model.modules())


def test_llama_causal_lm_lora_resumes_bitwise_and_generates_with_its_adapter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """llama-tiny on a packed causal_lm task, LoRA on q_proj / v_proj over an NF4 base:
    adapter-only checkpoints resume bit for bit, model/ is a LlamaForCausalLM checkpoint
    plus adapter/, `generate` runs the adapter model (it once reloaded the bare base) and
    `eval` reports perplexity. The LM head stays frozen (train_lm_head: false, the
    default) in int8 rows, out of the checkpoints, and model/ holds it dequantised."""
    from bitblend.runs.generate import Sampling, generate, load_lm

    data = {
        "name": "llama-lora",
        "model": {"backbone": "llama-tiny", "max_length": 32, "vocab_size": 300,
                  "adapter": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
                              "targets": ["q_proj", "v_proj"]}},
        "tasks": [{"name": "news", "data": "bbc_news", "head": "causal_lm", "max_examples": 24}],
        "precision": {"recipe": "bf16-mixed", "base_bits": 4},
        "optimizer": {"name": "adamw", "lr": 2e-2},
        "train": {"steps": 4, "batch_size": 2, "eval_max_examples": 4, "threads": 2,
                  "checkpoint_every": 2, "keep_checkpoints": 0},
    }  # fmt: skip
    recipe = recipe_from_dict(data)
    straight = tmp_path / "straight"
    trainer = _train(recipe, straight)
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    for name in ("model", "checkpoints/step-4"):
        shutil.rmtree(cut / name)
    for name in ("eval.json", "summary.json"):
        (cut / name).unlink()
    Trainer(recipe_from_dict(read_yaml(cut / "recipe.yaml")), cut, resume=True,
            show_progress=False).fit()  # fmt: skip
    a, b = _losses(straight), _losses(cut)
    assert [a[s] for s in (3, 4)] == [b[s] for s in (3, 4)]
    wa, wb = _weights(straight, 4), _weights(cut, 4)
    assert set(wa) == set(wb) and all("lora_" in n for n in wa)  # no base, no frozen head
    head = trainer.model.heads["news"]
    assert isinstance(head, FrozenBaseLinear) and head.bits == 8
    assert any("q_proj.lora_B" in n for n in wa) and not any("mlp" in n for n in wa)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name

    config = json.loads((straight / "model/config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (straight / "model/adapter/adapter_model.safetensors").is_file()
    model, tok = load_lm(straight)
    x = torch.tensor([tok("The market rose")["input_ids"]])
    live = trainer.model.eval()
    with torch.no_grad():
        ref = live("news", input_ids=x, attention_mask=torch.ones_like(x))
        got = model("news", input_ids=x, attention_mask=torch.ones_like(x))
        with peft_model(trainer.model).disable_adapter():
            bare = live("news", input_ids=x, attention_mask=torch.ones_like(x))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)  # NF4 base saved dequantised
    assert (bare - ref).abs().max() > 1e-3  # the adapter matters, so the check above bites
    greedy = Sampling(max_new_tokens=4, temperature=0.0)
    ids = generate(straight, "The market", greedy)[1]
    assert ids and ids == generate(cut, "The market", greedy)[1]

    data_file = tmp_path / "lm.jsonl"
    data_file.write_text('{"text": "shares fell on the stock market today"}\n')
    code, out, err = run_cli(["eval", str(straight), "--data", str(data_file), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["news"]["perplexity"] > 1.0
