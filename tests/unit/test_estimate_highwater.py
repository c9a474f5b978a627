"""The run's phases beyond the training step (estimate/highwater.py, #22 item 3, #19): an
evaluation's batch and kept outputs, a LoRA base's fp32 build and conversion, and the
dequantised low-bit base a save reads - each in the process peak the estimate prints."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bitblend.estimate import estimate_recipe, recipe_shapes
from bitblend.estimate.highwater import (
    HighWater,
    build_bytes,
    eval_live_bytes,
    high_water,
    save_bytes,
)
from bitblend.estimate.memory import CPU_ALLOCATOR_SLACK, precision_spec
from bitblend.estimate.shapes import TaskShape
from bitblend.models.adapters import base_state_dict
from bitblend.precision.base_weights import FrozenBaseEmbedding, FrozenBaseLinear
from tests.conftest import make_recipe
from tests.unit.test_estimate import _model

CPU = torch.device("cpu")
LORA = "model.adapter.kind=lora"


def _task(examples: int) -> TaskShape:
    return TaskShape("bbc", "classification", 5, batch=8, seq=64, eval_examples=examples)


def test_eval_bytes_grow_with_the_eval_split_and_batch() -> None:
    """The kept outputs grow with the split; the forward buffers with the eval batch."""
    shape, _, _ = recipe_shapes(make_recipe())
    spec = precision_spec("bf16-mixed")
    small = eval_live_bytes(shape, _task(100), spec, 64)
    large = eval_live_bytes(shape, _task(100_000), spec, 64)
    assert large["eval kept outputs"] == 100_000 * 5 * 4 > small["eval kept outputs"]
    assert large["eval forward buffers"] == small["eval forward buffers"]
    wide = eval_live_bytes(shape, _task(100_000), spec, 512)
    assert wide["eval forward buffers"] > large["eval forward buffers"]
    # a split smaller than the eval batch runs one batch of its own size
    assert (
        eval_live_bytes(shape, _task(8), spec, 64)["eval forward buffers"]
        < (small["eval forward buffers"])
    )


def test_a_large_eval_split_sets_the_process_peak() -> None:
    """The step's tensors do not see the eval split; the process peak takes the
    evaluation once its kept outputs and batch outweigh the step."""
    est = estimate_recipe(make_recipe("optimizer.name=sgd"), precision="recipe")
    row, task = est.rows[0], est.tasks[0]
    spec, eval_batch = row.spec, est.recipe.train.eval_batch_size
    assert row.high_water.eval < row.memory.peak  # 32 eval rows: the step is the peak
    step_only = est.runtime_bytes + round(row.memory.peak * (1 + CPU_ALLOCATOR_SLACK))
    assert est.total_bytes(row) == step_only
    huge = replace(task, eval_examples=2_000_000)  # (2M, 5) fp32 outputs: 40 MB
    row.high_water = high_water(est.shape, [huge], spec, row.memory, eval_batch)
    assert row.high_water.eval > row.memory.peak
    expected = est.runtime_bytes + round(row.high_water.eval * (1 + CPU_ALLOCATOR_SLACK))
    assert est.total_bytes(row) == expected > step_only


@pytest.mark.parametrize("bits", ["null", 16, 8, 4])
def test_lora_build_and_save_terms(bits: str) -> None:
    """A base stored narrower than fp32 leaves its fp32 build and stored copy in the heap;
    a low-bit base is read back dequantised at every save. Both reach the process peak."""
    recipe = make_recipe(LORA, f"precision.base_bits={bits}", "precision.recipe=bf16-mixed")
    shape, _, _ = recipe_shapes(recipe)
    ad = shape.adapter
    assert ad is not None
    spec = precision_spec("bf16-mixed")
    fp32 = ad.frozen_params * 4
    build, save = build_bytes(shape, spec), save_bytes(shape)
    if bits == "null":  # bf16-mixed keeps the frozen base in fp32: nothing converted
        assert build == save == 0
    else:
        assert build == fp32 + ad.frozen_bytes(spec.weight_bytes) > fp32
        assert save == (ad.quantised_params * 4 if bits in (8, 4) else 0)
    est = estimate_recipe(recipe, precision="recipe")
    row = est.rows[0]
    assert row.high_water.build == build and row.high_water.save == save
    # counted by layouts (tests/unit/test_estimate_layouts.py): build and save on top
    step = row.high_water.layout_process(row.memory.peak, row.memory.resident, 0)
    assert est.total_bytes(row) == est.runtime_bytes + step
    assert step - build - save == replace(row.high_water, build=0, save=0).layout_process(
        row.memory.peak, row.memory.resident, 0
    )


@pytest.mark.parametrize("bits", [8, 4])
def test_save_bytes_equal_the_real_dequantised_state_dict(bits: int) -> None:
    """What save_model reads of a low-bit base: fp32 tensors as large as the model says."""
    recipe = make_recipe(LORA, f"precision.base_bits={bits}", "precision.recipe=bf16-mixed")
    shape, _, _ = recipe_shapes(recipe)
    model, _ = _model(recipe, "bf16-mixed")
    ad = shape.adapter
    assert ad is not None
    frozen = [m for m in model.modules() if isinstance(m, FrozenBaseLinear | FrozenBaseEmbedding)]
    assert frozen  # the base really is stored in `bits`
    # the state_dict save_model writes: every 2-D (weight) tensor handed back in fp32
    state = base_state_dict(model.backbone)
    got = sum(v.numel() * v.element_size() for v in state.values() if v.dim() == 2)
    assert all(v.dtype == torch.float32 for v in state.values())
    assert got == save_bytes(shape)


def test_gpu_peaks_do_not_stack_the_build() -> None:
    hw = HighWater(build=100, eval=50, save=10)
    assert hw.process(80, runtime=1000, slack=0.25, cpu=False) == 100  # the conversion
    assert hw.process(120, runtime=1000, slack=0.25, cpu=False) == 120  # the step
    assert hw.process(80, runtime=1000, slack=0.25, cpu=True) == 1000 + 100 + 100 + 10
