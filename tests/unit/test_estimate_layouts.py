"""How many times a CPU process's heap holds a step's transient bytes (estimate/highwater.py,
#16 item 7, #19): resident state once, the step's transient bytes in two layouts (one
process's LoRA runs, DDP ranks) or three (FSDP2 on gloo), over the build and with the
save; and the per-rank tensor points those layouts stand on - DDP's gradient buckets that
exist from the start of backward, FSDP2's end of backward where the root unit's gradients
are reduce-scattered."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bitblend.estimate import estimate_recipe, recipe_shapes
from bitblend.estimate.highwater import (
    FSDP2_LAYOUTS,
    TRANSIENT_LAYOUTS,
    HighWater,
    checkpoint_bytes,
    layout_bytes,
    rank_process,
)
from bitblend.estimate.memory import (
    CPU_ALLOCATOR_SLACK,
    peak_bytes,
    precision_spec,
)
from bitblend.estimate.probe import save_peaks
from bitblend.estimate.ranks import RankBytes, gather_bytes, per_rank
from tests.conftest import make_recipe
from tests.unit.test_estimate import FAKE

CPU = torch.device("cpu")
LORA = "model.adapter.kind=lora"


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITBLEND_CACHE_DIR", str(tmp_path / "cache"))
    save_peaks(CPU, FAKE)


def test_layouts_count_resident_once_and_transient_n_times() -> None:
    hw = HighWater(build=100, eval=50, save=10, kept=30, layouts=2)
    # resident 60 (30 of it the build's kept base), step peak 200: transient 140
    assert layout_bytes(hw, 200, 60, runtime=1000, n=2) == 1000 + 100 + 30 + 2 * 140 + 10
    assert layout_bytes(hw, 200, 60, runtime=1000, n=3) == 1000 + 100 + 30 + 3 * 140 + 10
    assert hw.layout_process(200, 60, 1000) == layout_bytes(hw, 200, 60, 1000, 2)
    # an evaluation above the step sets the transient bytes
    big_eval = replace(hw, eval=300)
    assert big_eval.layout_process(200, 60, 1000) == 1000 + 100 + 30 + 2 * 240 + 10
    # the final checkpoint's state copy fills the steps' holes, and adds what exceeds them
    assert replace(hw, checkpoint=250).layout_process(200, 60, 1000) == hw.layout_process(
        200, 60, 1000
    )
    assert replace(hw, checkpoint=400).layout_process(200, 60, 1000) == 1000 + 100 + 30 + 400 + 10


def test_the_checkpoint_copy_fills_the_heap_holes() -> None:
    """Every optimizer state is cloned for the final checkpoint, MiniLM's 47 MB embedding
    states included: no block is mapped on its own (train/cpu_heap.py), so the copy
    comes from the heap's holes."""
    shape, tasks, _ = recipe_shapes(make_recipe("model.backbone=minilm"))
    spec = precision_spec("bf16-mixed")
    step = peak_bytes(shape, tasks[0], spec, states=2)
    assert checkpoint_bytes(step) == step.static.states > 2 * shape.vocab * shape.hidden * 4


@pytest.mark.parametrize("bits", ["null", 16, 8])
def test_a_lora_run_is_counted_by_layouts(bits: str) -> None:
    """The stored base is in the build once (not again in the step), the adapters' step is
    transient: runtime + build + the rest of the resident state + 2 x transient + save."""
    recipe = make_recipe(LORA, f"precision.base_bits={bits}", "precision.recipe=bf16-mixed")
    est = estimate_recipe(recipe, precision="recipe")
    row = est.rows[0]
    hw, m = row.high_water, row.memory
    shape, _, _ = recipe_shapes(recipe)
    assert shape.adapter is not None
    assert hw.layouts == TRANSIENT_LAYOUTS
    assert hw.kept == shape.adapter.frozen_bytes(row.spec.weight_bytes)
    assert m.resident >= hw.kept  # the frozen base is part of the step's resident weights
    transient = max(m.peak, hw.eval) - m.resident
    rest = m.resident - hw.kept
    assert hw.checkpoint == m.static.states < 2 * transient  # adapters': small
    expected = est.runtime_bytes + hw.build + rest + 2 * transient + hw.save
    assert est.total_bytes(row) == expected


def test_a_full_fine_tune_keeps_the_allocator_slack_model() -> None:
    est = estimate_recipe(make_recipe("precision.recipe=bf16-mixed"), precision="recipe")
    row = est.rows[0]
    assert row.high_water.layouts == 0 and row.high_water.kept == 0
    hw = row.high_water  # the step, an evaluation or the checkpoint's staging, the worst
    tensors = max(row.memory.peak, hw.eval, hw.checkpoint_live)
    assert hw.checkpoint_live > row.memory.peak  # tiny-bert: AdamW's staged copies decide
    slack = round(tensors * (1 + CPU_ALLOCATOR_SLACK))
    # + bf16 kernels kept per matmul shape (estimate/kernel_cache.py)
    assert est.total_bytes(row) == est.runtime_bytes + slack + hw.kernel_cache


def test_ddp_buckets_exist_from_the_start_of_backward() -> None:
    """gradient_as_bucket_view: the gradients are views into buckets allocated when the
    model is wrapped, so they sit beside the activations and count as resident."""
    shape, tasks, _ = recipe_shapes(make_recipe("train.batch_size=8"))
    spec = precision_spec("bf16-mixed")
    base = peak_bytes(shape, tasks[0], spec, states=2)
    ddp = {r.strategy: r for r in per_rank(shape, spec, base, 2)}["ddp"]
    grads = base.static.grads
    assert ddp.resident == base.resident + grads
    assert ddp.peak == base.resident + grads + base.activations + base.temporary_total
    assert ddp.peak > base.peak  # without buckets, one process's backward has no grads
    one = {r.strategy: r for r in per_rank(shape, spec, base, 1)}["ddp"]
    assert one.peak == base.peak and one.resident == base.resident


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fsdp2_end_of_backward_reduce_scatters_the_root(precision: str) -> None:
    """With activations this small the end of backward is the peak: the shard, every
    other unit's gradient shard, and the root (embeddings, heads) gathered with its
    unsharded gradients and their reduce-dtype copy."""
    shape, tasks, _ = recipe_shapes(make_recipe("train.batch_size=1", "model.max_length=8"))
    spec = precision_spec(precision)
    base = peak_bytes(shape, replace(tasks[0], batch=1, seq=8), spec, states=2)
    for n in (2, 4):
        fsdp = {r.strategy: r for r in per_rank(shape, spec, base, n)}["fsdp2"]
        root = shape.params - shape.layers * shape.layer_params
        width = gather_bytes(spec)
        end = base.resident / n + base.static.grads / n + root * (2 * width + spec.grad_bytes)
        assert fsdp.peak == round(end)
        assert fsdp.resident == round(base.resident / n)


def _rank(strategy: str, peak: int, resident: int, ranks: int = 2) -> RankBytes:
    return RankBytes(strategy, ranks, peak, peak, "", 0, 1, resident)


def test_rank_process_layouts_per_strategy() -> None:
    shape, tasks, _ = recipe_shapes(make_recipe())
    spec = precision_spec("bf16-mixed")
    base = peak_bytes(shape, tasks[0], spec, states=2)
    hw = HighWater(build=0, eval=0, save=0)
    run = 1000
    ddp = rank_process(_rank("ddp", 500, 300), base, hw, run, CPU_ALLOCATOR_SLACK, cpu=True)
    assert ddp == run + 300 + TRANSIENT_LAYOUTS * 200
    # rank 0 writes the checkpoint: a state copy larger than the steps' holes adds
    saved = rank_process(
        _rank("ddp", 500, 300), base, replace(hw, checkpoint=700), run, CPU_ALLOCATOR_SLACK, True
    )
    assert saved == run + 300 + 700
    fsdp = rank_process(_rank("fsdp2", 500, 300), base, hw, run, CPU_ALLOCATOR_SLACK, cpu=True)
    # a third layout, and rank 0's unsharded replica for model/ on top
    full = base.static.weights
    assert fsdp == run + max(300 + FSDP2_LAYOUTS * 200, full) + full
    assert fsdp > ddp
    # one rank: the single process's model, unchanged
    one = rank_process(_rank("fsdp2", 500, 300, 1), base, hw, run, CPU_ALLOCATOR_SLACK, True)
    assert one == hw.process(500, run, CPU_ALLOCATOR_SLACK, cpu=True)
    # CUDA: live tensors, nothing stacks
    gpu = rank_process(_rank("fsdp2", 500, 300), base, hw, run, CPU_ALLOCATOR_SLACK, cpu=False)
    assert gpu == max(500, full)


def test_estimate_reports_each_ranks_process_by_layouts() -> None:
    recipe = make_recipe("precision.recipe=bf16-mixed", "train.batch_size=8")
    est = estimate_recipe(recipe, precision="recipe", ranks=2, device=CPU)
    row = est.rows[0]
    ranks = {r.strategy: r for r in row.ranks}
    for k in ranks.values():
        assert est.rank_bytes(row, k) == rank_process(
            k, row.memory, row.high_water, est.runtime_bytes, CPU_ALLOCATOR_SLACK, True
        )
    assert est.rank_bytes(row, ranks["ddp"]) > est.runtime_bytes + ranks["ddp"].peak
