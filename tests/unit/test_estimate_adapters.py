"""The cost model on LoRA runs (#19): a frozen backbone has weights only - in
precision.base_bits' format - and no gradients or optimizer state; the adapters and heads
train; saved activations and the trainer's measured model state match the estimate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bitblend.estimate import estimate_recipe, recipe_shapes
from bitblend.estimate.flops import step_flops
from bitblend.estimate.memory import (
    activation_bytes,
    precision_spec,
    static_bytes,
    temporary_bytes,
)
from bitblend.estimate.shapes import TaskShape
from bitblend.precision.base_weights import (
    FrozenBaseEmbedding,
    FrozenBaseLinear,
    stored_weight_bytes,
    weight_bytes,
)
from tests.conftest import make_recipe
from tests.unit.test_estimate import FAKE, _model, _saved_bytes

CPU = torch.device("cpu")
LORA = "model.adapter.kind=lora"


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("shape", [(32, 64), (384, 384), (1536, 384)])
def test_stored_weight_bytes_formula_equals_the_real_modules(
    bits: int, shape: tuple[int, int]
) -> None:
    rows, cols = shape
    for dtype, width in ((torch.float32, 4), (torch.bfloat16, 2)):  # 32-true, bf16-true
        linear = FrozenBaseLinear(nn.Linear(cols, rows, bias=False, dtype=dtype), bits)
        assert stored_weight_bytes("linear", rows, cols, bits, width) == linear.stored_bytes()
    table = FrozenBaseEmbedding(nn.Embedding(rows, cols), bits)
    assert stored_weight_bytes("embedding", rows, cols, bits) == table.stored_bytes()


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-gpt"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("bits", [None, 16, 8, 4])
def test_lora_weights_grads_and_trainable_params_match_the_built_model(
    backbone: str, precision: str, bits: int | None
) -> None:
    """Weights as stored (low-bit codes and scales for the frozen base), gradients and
    optimizer states only for what trains (adapters, heads)."""
    b = "null" if bits is None else bits
    recipe = make_recipe(f"model.backbone={backbone}", LORA, f"precision.base_bits={b}")
    shape, _, _ = recipe_shapes(recipe)
    model, _ = _model(recipe, precision)
    assert shape.params == sum(p.numel() for p in model.parameters()) or bits is not None
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert shape.trainable[0] == sum(p.numel() for p in trainable)
    static = static_bytes(shape, precision_spec(precision), states=2)
    assert static.weights == weight_bytes(model)
    assert static.grads == sum(p.numel() * p.element_size() for p in trainable)
    assert static.states == 2 * 4 * sum(p.numel() for p in trainable)


def test_a_llama_lm_head_counts_as_frozen_base_unless_it_trains() -> None:
    """llama-tiny with its checkpoint-class causal_lm head under LoRA over NF4: the
    estimate's parameters, weights as stored (the frozen head in int8 rows), gradients and
    states equal the built model's, at the recipe's model.vocab_size (not llama's default
    8192); with model.adapter.train_lm_head the head's vocab x width weights (no bias)
    train instead, and a frozen head skips its weight-gradient matmul."""
    llama = ("model.backbone=llama-tiny", "model.vocab_size=512", "tasks.0.head=causal_lm")
    recipe = make_recipe(*llama, LORA, "precision.base_bits=4")
    shape, tasks, _ = recipe_shapes(recipe)
    model, _ = _model(recipe, "bf16-mixed")
    assert shape.params == sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert shape.trainable[0] == sum(p.numel() for p in trainable)
    assert shape.adapter is not None and shape.adapter.frozen_heads == (tasks[0].name,)
    static = static_bytes(shape, precision_spec("bf16-mixed"), states=2)
    assert static.weights == weight_bytes(model)
    assert static.grads == sum(p.numel() * p.element_size() for p in trainable)
    assert static.states == 2 * 4 * sum(p.numel() for p in trainable)
    trained = recipe_shapes(make_recipe(*llama, LORA, "model.adapter.train_lm_head=true"))[0]
    assert trained.adapter is not None and not trained.adapter.frozen_heads
    assert trained.trainable[0] == shape.trainable[0] + 512 * shape.hidden
    flops = step_flops(shape, tasks[0]).backward
    assert flops < step_flops(trained, tasks[0]).backward


@pytest.mark.slow
def test_a_frozen_llama_lm_head_saves_neither_its_input_nor_a_weight_copy() -> None:
    """What freezing the LM head takes off a bf16-mixed step's saved tensors (its bf16
    input and autocast's bf16 copy of its weight: an int8 head is dequantised again in
    backward) equals what the estimate takes off activations + autocast copies."""
    spec, got, est = precision_spec("bf16-mixed"), {}, {}
    for train_head in (False, True):
        recipe = make_recipe("model.backbone=llama-tiny", "model.vocab_size=512",
                             "tasks.0.head=causal_lm", LORA, "precision.base_bits=8",
                             f"model.adapter.train_lm_head={str(train_head).lower()}")  # fmt: skip
        shape, tasks, _ = recipe_shapes(recipe)
        task = TaskShape(tasks[0].name, "causal_lm", tasks[0].outputs, batch=4, seq=32)
        acts = activation_bytes(shape, task, spec)
        copies = temporary_bytes(shape, task, spec, acts).get("autocast weight copies", 0)
        est[train_head] = acts.total + copies
        got[train_head] = _saved_bytes(*_model(recipe, "bf16-mixed"), "causal_lm", 4, 32)
    assert est[True] - est[False] == got[True] - got[False] > 0


def test_the_frozen_base_shrinks_with_base_bits() -> None:
    """Per frozen base parameter: fp32 (null, 32-true) > bf16 > int8 > NF4 (~0.5 B)."""
    sizes = {}
    for bits in ("null", 16, 8, 4):
        recipe = make_recipe("model.backbone=tiny-gpt", LORA, f"precision.base_bits={bits}")
        shape, _, _ = recipe_shapes(recipe)
        sizes[bits] = static_bytes(shape, precision_spec("32-true"), states=2).total
    assert sizes["null"] > sizes[16] > sizes[8] > sizes[4]


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-gpt"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize(
    "sets",
    [[], ["precision.base_bits=16"], ["precision.base_bits=8"],
     ["model.adapter.targets=all-linear"]],
)  # fmt: skip
def test_lora_activation_bytes_equal_saved_tensors(
    backbone: str, precision: str, sets: list[str]
) -> None:
    """Frozen projections save no input, adapters save theirs, nothing before the first
    block needs a gradient: within 4% of the saved-tensor hooks' count (1% for the
    default q/v targets)."""
    recipe = make_recipe(f"model.backbone={backbone}", LORA, *sets)
    shape, _, _ = recipe_shapes(recipe)
    model, prec = _model(recipe, precision)
    task = TaskShape("bbc", "classification", 5, batch=4, seq=32)
    spec = precision_spec(precision)
    acts = activation_bytes(shape, task, spec)
    autocast = temporary_bytes(shape, task, spec, acts).get("autocast weight copies", 0)
    got = _saved_bytes(model, prec, "classification", 4, 32)
    tol = 0.04 if sets and "all-linear" in sets[0] else 0.03
    assert acts.total + autocast == pytest.approx(got, rel=tol)


def test_lora_backward_skips_the_frozen_weight_gradients() -> None:
    full = make_recipe("model.backbone=tiny-gpt")
    lora = make_recipe("model.backbone=tiny-gpt", LORA)
    task = TaskShape("bbc", "classification", 5, batch=4, seq=32)
    f = step_flops(recipe_shapes(full)[0], task)
    a = step_flops(recipe_shapes(lora)[0], task)
    assert a.backward < f.backward and a.forward > f.forward  # + the adapters' matmuls


@pytest.mark.slow
@pytest.mark.parametrize("bits", [16, 4])
def test_lora_model_state_matches_the_trainers_measurement(
    bits: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The estimate's weights + grads + states of a LoRA run equal summary.json's
    model_state_bytes (measured on the real tensors after the first step), within 3%."""
    from bitblend.estimate.probe import save_peaks
    from bitblend.train.trainer import Trainer

    # The fake peaks go to this test's own cache: in the user's they poison every later
    # MFU and time estimate on the machine (it happened).
    monkeypatch.setenv("BITBLEND_CACHE_DIR", str(tmp_path / "cache"))
    save_peaks(CPU, FAKE)
    recipe = make_recipe(
        LORA, f"precision.base_bits={bits}", "precision.recipe=bf16-mixed", "train.steps=1"
    )
    est = estimate_recipe(recipe, precision="recipe", device=CPU)
    predicted = est.rows[0].memory.static.total
    summary = Trainer(recipe, tmp_path / "run", show_progress=False).fit()
    assert predicted == pytest.approx(summary["model_state_bytes"], rel=0.03)
    assert not any("priced as a full fine-tune" in w for w in est.rows[0].warnings)
