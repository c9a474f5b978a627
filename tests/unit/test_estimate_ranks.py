"""`bitblend estimate --ranks N` (#16 item 7): each rank runs its slice of the global batch,
FSDP2 shards the model state N ways, and the bytes each rank sends per step follow the ring
collectives of DDP (all-reduce of the gradients) and FSDP2 (all-gather of the parameters in
forward and backward, reduce-scatter of the gradients)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bitblend.estimate import estimate_recipe, recipe_shapes
from bitblend.estimate.memory import peak_bytes, precision_spec
from bitblend.estimate.probe import save_peaks
from bitblend.estimate.ranks import comm_bytes, per_rank
from tests.conftest import make_recipe
from tests.unit.test_estimate import FAKE

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITBLEND_CACHE_DIR", str(tmp_path / "cache"))
    save_peaks(CPU, FAKE)


@pytest.mark.parametrize("ranks", [2, 4])
def test_each_rank_runs_its_slice_of_the_global_batch(ranks: int) -> None:
    recipe = make_recipe("train.batch_size=8", "precision.recipe=32-true")
    est = estimate_recipe(recipe, precision="recipe", ranks=ranks, device=CPU)
    row = est.rows[0]
    shape, tasks, _ = recipe_shapes(recipe)
    spec = precision_spec("32-true")
    local = peak_bytes(shape, replace(tasks[0], batch=math.ceil(8 / ranks)), spec, states=2)
    ddp = {r.strategy: r for r in row.ranks}["ddp"]
    assert ddp.batch == math.ceil(8 / ranks)
    # a replica with its own activations, beside gradient buckets that exist all along
    buckets = local.resident + local.static.grads + local.activations + local.temporary_total
    assert ddp.peak == max(local.peak, buckets)
    assert local.activations < row.memory.activations


def test_fsdp2_shards_the_model_state() -> None:
    shape, tasks, _ = recipe_shapes(make_recipe("model.backbone=tiny-gpt"))
    spec = precision_spec("32-true")
    base = peak_bytes(shape, tasks[0], spec, states=2)
    two = {r.strategy: r for r in per_rank(shape, spec, base, 2)}
    four = {r.strategy: r for r in per_rank(shape, spec, base, 4)}
    state = base.resident + base.static.grads + base.step_extra
    # the optimizer-step peak (activations freed) holds 1/N of the state per rank
    assert four["fsdp2"].peak < two["fsdp2"].peak < two["ddp"].peak
    assert two["fsdp2"].peak >= state / 2


@pytest.mark.parametrize("precision,gather", [("32-true", 4), ("bf16-mixed", 2), ("bf16-true", 2)])
def test_communication_volume_follows_the_ring_collectives(precision: str, gather: int) -> None:
    shape, _, _ = recipe_shapes(make_recipe())
    spec = precision_spec(precision)
    grads = 1_000_000
    for n in (2, 4, 8):
        f = (n - 1) / n
        vol = comm_bytes(shape, spec, grads, n, grad_accum=3)
        assert vol["ddp"] == round(3 * 2 * f * grads)
        params = shape.fp32_params * 4 + (shape.params - shape.fp32_params) * gather
        assert vol["fsdp2"] == round(3 * (2 * f * params + f * grads))


def test_one_rank_sends_nothing_and_holds_the_single_process_peak() -> None:
    recipe = make_recipe()
    est = estimate_recipe(recipe, precision="recipe", ranks=1, device=CPU)
    row = est.rows[0]
    assert {r.comm_bytes for r in row.ranks} == {0}
    assert {r.peak for r in row.ranks} == {row.memory.peak}


@pytest.mark.slow
def test_measured_runtime_holds_what_train_imports_and_tokenises() -> None:
    """The runtime child (train's imports, data, tokenisation) holds more than a fresh
    process's python + torch + transformers + the estimate: what a CLI estimate's own RSS
    would say. (Compared with a fresh process, not this one: pytest's RSS grows with the
    tests before; the child's peak is its own, not this process's: procmem.py.)"""
    import json
    import subprocess
    import sys

    code = ("import json, torch, transformers; from bitblend.estimate import "
            "process_resident_bytes; print(json.dumps(process_resident_bytes()))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    bare = json.loads(out.strip().splitlines()[-1])
    est = estimate_recipe(make_recipe(), precision="recipe", device=CPU, runtime="measure")
    assert est.runtime_bytes > 200 * 2**20
    assert est.runtime_bytes > bare, (est.runtime_bytes, bare)


def test_runtime_child_trains_the_llama_bpe_as_train_does() -> None:
    """The runtime child encodes with the tokenizer train uses: for a llama alias the BPE
    trained on the recipe's text, not the meta-device config's untrained bytes (which
    encoded BBC News 3-5x longer and read a 960 MiB runtime for a 639 MiB setup)."""
    from bitblend.estimate.runtime import run_tokenizer
    from bitblend.models.llama import llama_tokenizer
    from bitblend.taskspec import load_data

    recipe = make_recipe("model.backbone=llama-tiny", "model.vocab_size=300")
    datas = load_data(recipe)
    text = next(str(t) for d in datas if d.train.text is not None for t in d.train.text)
    trained = run_tokenizer(recipe, datas)
    untrained = llama_tokenizer(None, recipe.model.vocab_size)
    assert len(trained(text)["input_ids"]) < len(untrained(text)["input_ids"])
