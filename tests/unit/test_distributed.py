"""train/distributed.py without several processes: strategy rules, one-line refusals,
the `--nproc` launcher's checks, and the no-op single-process context."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from bitblend.cli import main
from bitblend.commands.train import _strip_nproc
from bitblend.errors import BitblendError
from bitblend.models.backbones import load_backbone
from bitblend.train import distributed
from bitblend.train.distributed import (
    DistContext,
    check_recipe,
    default_threads,
    resolve_strategy,
    transformer_blocks,
)
from bitblend.train.step import StepLosses
from tests.conftest import make_recipe, tiny_recipe_dict


def test_auto_is_none_for_one_process_and_ddp_for_several() -> None:
    assert resolve_strategy("auto", 1) == "none"
    assert resolve_strategy("auto", 4) == "ddp"
    assert resolve_strategy("fsdp2", 1) == "fsdp2"
    with pytest.raises(BitblendError, match="none runs one process but torchrun started 2"):
        resolve_strategy("none", 2)


@pytest.mark.parametrize(
    ("overrides", "strategy", "field"),
    [
        (["mixing.balancing=upgrad", "mixing.batches=mixed"], "ddp", "mixing.balancing"),
        (["mixing.balancing=pcgrad", "mixing.batches=mixed"], "fsdp2", "mixing.balancing"),
        (["precision.state_bits=8"], "fsdp2", "precision.state_bits"),
        (["precision.recipe=fp8-emulated"], "fsdp2", "precision.recipe"),
        (["precision.recipe=bf16-true"], "fsdp2", "precision.recipe"),
        (["mixing.grad_cosine_every=5"], "fsdp2", "mixing.grad_cosine_every"),
    ],
)
def test_unsupported_combinations_are_refused_naming_the_field(
    overrides: list[str], strategy: str, field: str
) -> None:
    with pytest.raises(BitblendError) as err:
        check_recipe(make_recipe(*overrides), strategy)
    assert str(err.value).startswith(field + ":")
    assert "\n" not in str(err.value)


def test_a_batch_the_ranks_cannot_share_equally_is_refused() -> None:
    with pytest.raises(BitblendError, match=r"^train.batch_size: 6 is not divisible by 4 ranks"):
        check_recipe(make_recipe("train.batch_size=6"), "ddp", 4)
    with pytest.raises(BitblendError, match=r"^tasks\[0\].batch_size: 3 is not divisible"):
        check_recipe(make_recipe("tasks.0.batch_size=3"), "fsdp2", 2)
    check_recipe(make_recipe("train.batch_size=6"), "ddp", 3)


@pytest.mark.parametrize(
    "overrides",
    [["precision.state_bits=8"], ["precision.recipe=fp8-emulated"], ["mixing.balancing=famo"]],
)
def test_what_ddp_runs(overrides: list[str]) -> None:
    check_recipe(make_recipe(*overrides), "ddp")  # low-bit states, fp8, famo: replicated


def test_nproc_refuses_upgrad_before_starting_torchrun(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bitblend train --nproc 2` checks the recipe in the launching process: one line."""
    data = tiny_recipe_dict(mixing={"balancing": "upgrad", "batches": "mixed"})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["train", str(path), "--nproc", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("bitblend: error: mixing.balancing: upgrad aggregates")
    assert not (tmp_path / "out").exists()


def test_nproc_refuses_strategy_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(distributed={"strategy": "none"})))
    assert main(["train", str(path), "--nproc", "2"]) == 2
    assert "distributed.strategy: none" in capsys.readouterr().err


def test_nproc_zero_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "tiny", "--nproc", "0"]) == 2
    assert "--nproc 0: expected an integer >= 1" in capsys.readouterr().err


def test_strip_nproc_keeps_everything_else() -> None:
    argv = ["--debug", "train", "r.yaml", "--nproc", "2", "--set", "a=1", "--nproc=3", "--quiet"]
    assert _strip_nproc(argv) == ["--debug", "train", "r.yaml", "--set", "a=1", "--quiet"]


def test_one_process_context_is_a_no_op() -> None:
    ctx = distributed.init(make_recipe().distributed, "cpu")
    assert (ctx.strategy, ctx.rank, ctx.world_size, ctx.main, ctx.active) == (
        "none", 0, 1, True, False
    )  # fmt: skip
    res = StepLosses(losses={0: 1.5}, examples={0: 8}, tokens=100)
    assert ctx.reduce_step(res, 2) is res
    assert ctx.broadcast("x") == "x" and ctx.gather(3) == [3]
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    assert ctx.with_rank_rngs(rng) is rng
    assert torch.equal(ctx.own_rng(rng), rng["torch"])
    model = torch.nn.Linear(2, 2)
    assert ctx.wrap(model, None) is model


def test_own_rng_falls_back_to_rank_0_when_the_world_changed() -> None:
    states = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]
    rng = {"torch": states[0], "ranks": states}
    assert int(DistContext(strategy="ddp", rank=1, world_size=2).own_rng(rng)[0]) == 2
    assert int(DistContext(strategy="ddp", rank=3, world_size=4).own_rng(rng)[0]) == 1


def test_threads_are_the_cores_shared_by_the_local_ranks() -> None:
    cores = default_threads(1)
    assert default_threads(2) == max(1, cores // 2)
    assert default_threads(10_000) == 1


@pytest.mark.parametrize(("backbone", "count"), [("tiny-bert", 2), ("tiny-gpt", 2)])
def test_transformer_blocks_are_the_backbones_layers(backbone: str, count: int) -> None:
    model, _ = load_backbone(backbone, None, None, "torch")
    blocks = transformer_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers == count
    assert len({type(b) for b in blocks}) == 1


def test_fsdp_policy_names_dtypes_in_precision_only() -> None:
    from bitblend.precision.recipes import build_precision

    cfg = make_recipe("precision.recipe=bf16-mixed").precision
    block, fp32 = build_precision(cfg, torch.device("cpu")).fsdp_policies()
    assert (block.param_dtype, block.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert fp32.param_dtype == torch.float32
    cfg32 = make_recipe("precision.recipe=32-true").precision
    block32, _ = build_precision(cfg32, torch.device("cpu")).fsdp_policies()
    assert block32.param_dtype is None and block32.reduce_dtype is None


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 4])
def test_ddp_all_reduces_once_per_step_whatever_the_accumulation(
    accum: int, tmp_path: Path
) -> None:
    """DDP in a real gloo group of one: with grad_accum 4 the micro-batches before the last
    run under no_sync, so the step all-reduces each gradient bucket once, as with 1."""
    from bitblend.train.trainer import Trainer

    recipe = make_recipe("distributed.strategy=ddp", f"train.grad_accum={accum}", "train.steps=1")
    reduced: list[int] = []
    views: list[bool] = []

    # Unannotated: DDP checks a hook's annotation against dist.GradBucket itself, and this
    # module's annotations are strings (from __future__ import annotations).
    def count(state, bucket):  # type: ignore[no-untyped-def]
        reduced.append(bucket.index())
        home = bucket.buffer().untyped_storage().data_ptr()
        views.extend(p.grad.untyped_storage().data_ptr() == home for p in bucket.parameters())
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(bucket.buffer())  # a group of one: the sum is the buffer itself
        return fut

    try:
        trainer = Trainer(recipe, tmp_path / "run", show_progress=False)
        trainer.fwd.register_comm_hook(None, count)
        trainer.train_step()
    finally:
        distributed.teardown()
    assert reduced and reduced.count(0) == 1, reduced  # one pass over the buckets
    # gradient_as_bucket_view: the gradients live in the buckets (no second buffer, no copy)
    assert views and all(views), views


def test_ranks_draw_their_own_mlm_masks_and_rank_0_keeps_the_one_process_stream() -> None:
    """Every rank collates its slice with the micro-batch's generator: ranks > 0 need
    streams of their own, or each rank would mask the same positions of its rows."""
    from bitblend.train.step import _generator

    def draw(rank: int) -> torch.Tensor:
        return torch.rand(4, 32, generator=_generator(3, 5, 0, 1, rank))

    one_process = torch.rand(4, 32, generator=_generator(3, 5, 0, 1))
    assert torch.equal(draw(0), one_process)
    assert not torch.equal(draw(1), draw(0)) and not torch.equal(draw(2), draw(1))
    assert torch.equal(draw(1), draw(1))  # still a function of (seed, step, task, micro, rank)
