"""The estimate on users' recipes (#22, #17): an own-vocabulary task leaves the backbone's
token table without gradients or optimizer states, llama-<size> is counted as train builds
it (the recipe's vocabulary, one untied LM head per causal_lm task, GQA + SwiGLU blocks),
and a checkpoint's staged copies of the optimizer state are a phase of their own."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from bitblend.config.load import recipe_from_dict
from bitblend.estimate import recipe_shapes
from bitblend.estimate.memory import activation_bytes, precision_spec, static_bytes, temporary_bytes
from bitblend.estimate.probe import save_peaks
from bitblend.estimate.shapes import TaskShape
from bitblend.precision.recipes import build_precision
from bitblend.tasks.losses import compute_loss
from bitblend.taskspec import load_data
from bitblend.train.setup import build_model, convert_model
from tests.conftest import make_recipe, tiny_recipe_dict
from tests.unit.test_estimate import FAKE

CPU = torch.device("cpu")
LLAMA = ("model.backbone=llama-tiny", "tasks.0.head=causal_lm", "model.vocab_size=300")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITBLEND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BITBLEND_ESTIMATE_RUNTIME", "self")
    save_peaks(CPU, FAKE)


def _model(recipe: Any, precision: str) -> tuple[Any, Any]:
    model, _, _ = build_model(recipe, load_data(recipe))
    prec = build_precision(replace(recipe.precision, recipe=precision), CPU)
    convert_model(model, recipe, prec)
    model.train()
    return model, prec


def _saved_bytes(model: Any, prec: Any, batch: int, seq: int) -> int:
    """Distinct storages autograd saves for a causal-LM forward + loss (params aside)."""
    params = {p.untyped_storage().data_ptr() for p in itertools.chain(model.parameters())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(3, 250, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with prec.forward_context():
            logits = model("bbc", input_ids=ids, attention_mask=mask)
        compute_loss("cross_entropy", logits, ids, "causal_lm")
    return sum(seen.values())


# -- own vocabulary: the backbone's token table idles -------------------------------------
def test_own_vocabulary_leaves_the_token_table_idle() -> None:
    """Only tasks reading the backbone's tokenizer feed its table; with an own-vocabulary
    task alone it is idle (vocab x width), with a second backbone-vocabulary task it is not."""
    own = make_recipe("tasks.0.tokenizer=wordpiece", "tasks.0.wordpiece_vocab=500")
    shape, _, _ = recipe_shapes(own)
    assert shape.idle_params == shape.vocab * shape.hidden > 0
    plain, _, _ = recipe_shapes(make_recipe())
    assert plain.idle_params == 0
    data = tiny_recipe_dict()
    data["tasks"] = [
        {"name": "bbc", "data": "bbc_news", "max_examples": 256, "tokenizer": "wordpiece",
         "wordpiece_vocab": 500},
        {"name": "news", "data": "bbc_news", "max_examples": 256},
    ]  # fmt: skip
    assert recipe_shapes(recipe_from_dict(data))[0].idle_params == 0


def test_idle_table_has_no_optimizer_state(tmp_path: Path) -> None:
    """After a real step with an own-vocabulary task, AdamW holds states for every trainable
    parameter but the backbone's table (its grad stayed None): the estimate's states equal
    the optimizer's exactly; counting the table would be far off (tiny-bert is mostly its
    table)."""
    from bitblend.precision.update import state_bytes
    from bitblend.train.trainer import Trainer

    recipe = make_recipe(
        "tasks.0.tokenizer=wordpiece", "tasks.0.wordpiece_vocab=500", "train.steps=1"
    )
    shape, _, _ = recipe_shapes(recipe)
    spec = precision_spec("32-true")
    trainer = Trainer(recipe, tmp_path / "run", show_progress=False)
    trainer.train_step()
    table = trainer.model.backbone.get_input_embeddings().weight
    assert table.requires_grad and table not in trainer.optimizer.state
    measured = state_bytes(trainer.optimizer)
    # (state_bytes adds AdamW's 4-byte step counters)
    assert static_bytes(shape, spec, states=2).states == pytest.approx(measured, rel=1e-3)
    assert static_bytes(replace(shape, idle_params=0), spec, states=2).states > 1.5 * measured


# -- llama-<size> ---------------------------------------------------------------------------
def test_llama_parameters_follow_the_recipes_vocabulary() -> None:
    """model.vocab_size sets the embedding rows, and each causal_lm task has its own untied,
    bias-free LlamaForCausalLM head of that many outputs: the count is exact."""
    recipe = make_recipe(*LLAMA)
    shape, tasks, _ = recipe_shapes(recipe)
    model, _, _ = build_model(recipe, load_data(recipe))
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.trunk_params == sum(p.numel() for p in model.backbone.parameters())
    assert tasks[0].outputs == 300 and shape.family == "llama" and shape.kv_heads == 2


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize(("batch", "seq"), [(4, 32), (1, 300)])
def test_llama_activations_equal_saved_tensors(precision: str, batch: int, seq: int) -> None:
    """RMSNorm's fp32 pair, fused q/k/v, SwiGLU's four (T, i) tensors and bitblend's
    attention over grouped k/v heads (300 tokens: in causal blocks of 128, whose
    probabilities alone are saved): within 1% of the saved-tensor hooks' count on
    llama-tiny."""
    recipe = make_recipe(*LLAMA)
    shape, tasks, _ = recipe_shapes(recipe)
    model, prec = _model(recipe, precision)
    task = TaskShape("bbc", "causal_lm", tasks[0].outputs, batch=batch, seq=seq)
    spec = precision_spec(precision)
    acts = activation_bytes(shape, task, spec)
    autocast = temporary_bytes(shape, task, spec, acts).get("autocast weight copies", 0)
    assert acts.attention == "bitblend"
    saved = _saved_bytes(model, prec, batch, seq)
    assert acts.total + autocast == pytest.approx(saved, rel=0.01)


# -- a checkpoint's staged copies ----------------------------------------------------------
@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_checkpoint_stages_a_copy_of_states_and_masters(precision: str, tmp_path: Path) -> None:
    """save_checkpoint flattens the trainer's state, cloning every tensor: the optimizer's
    states and (bf16-true) the fp32 masters. The estimate's staged bytes equal those copies
    within 1% (RNG states and step counters are the rest)."""
    from bitblend.estimate.highwater import checkpoint_live_bytes
    from bitblend.estimate.memory import optimizer_states, peak_bytes
    from bitblend.train.checkpoint import _flatten
    from bitblend.train.trainer import Trainer

    recipe = make_recipe(f"precision.recipe={precision}", "train.steps=1")
    shape, tasks, _ = recipe_shapes(recipe)
    trainer = Trainer(recipe, tmp_path / "run", show_progress=False)
    trainer.train_step()
    staged: dict[str, torch.Tensor] = {}
    _flatten(trainer.state_dict(), "s", staged)
    copies = sum(t.numel() * t.element_size() for t in staged.values())
    step = peak_bytes(shape, tasks[0], precision_spec(precision), optimizer_states("adamw"))
    assert checkpoint_live_bytes(step) - step.resident == pytest.approx(copies, rel=0.01)


def test_causal_shift_copies_the_fp32_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """causal_lm's loss hands cross_entropy a fresh (T', vocab) fp32 tensor, not a view of
    the upcast logits (their shifted slice is not contiguous): one more fp32 logits copy,
    which the estimate counts for causal_lm only."""
    import bitblend.tasks.losses as losses
    from bitblend.estimate.memory import causal_shift_bytes

    seen: list[torch.Tensor] = []
    real = losses.F.cross_entropy

    def spy(inp: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        seen.append(inp)
        return real(inp, *a, **k)

    monkeypatch.setattr(losses.F, "cross_entropy", spy)
    logits = torch.randn(2, 16, 50, dtype=torch.bfloat16)
    compute_loss("cross_entropy", logits, torch.randint(0, 50, (2, 16)), "causal_lm")
    flat = seen[0]
    assert flat.dtype == torch.float32 and flat._base is None and flat.shape == (30, 50)
    lm = TaskShape("lm", "causal_lm", 50, batch=2, seq=16)
    assert causal_shift_bytes(lm) == {"causal_lm shifted logits copy": 2 * 16 * 50 * 4}
    assert causal_shift_bytes(replace(lm, head="masked_lm")) == {}


def test_an_idle_table_costs_no_optimizer_time() -> None:
    """Fused AdamW skips a parameter without a gradient: the optimizer's traffic counts the
    trained parameters only (an own-vocabulary task leaves the backbone's table idle)."""
    from bitblend.estimate.flops import step_time

    own = make_recipe("tasks.0.tokenizer=wordpiece", "tasks.0.wordpiece_vocab=500")
    shape, tasks, _ = recipe_shapes(own)
    assert shape.idle_params > 0
    spec = precision_spec("bf16-mixed")
    task = TaskShape("bbc", "classification", tasks[0].outputs, batch=4, seq=32)
    acts = activation_bytes(shape, task, spec)
    idle = step_time(shape, task, spec, acts, FAKE).parts["optimizer"]
    busy = step_time(replace(shape, idle_params=0), task, spec, acts, FAKE).parts["optimizer"]
    trained = shape.params - shape.idle_params
    assert idle == pytest.approx(busy * trained / shape.params, rel=1e-9)
