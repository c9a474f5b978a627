"""Balancing against the `sum` path (issue 14, item 6): UPGrad/PCGrad weigh tasks by their
mixture shares as `sum` does, and uncertainty weights learn from unscaled gradients of the
step they belong to."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from bitblend.config.load import apply_overrides, recipe_from_dict
from bitblend.tasks.balancing import Balancer
from bitblend.train import step as step_fn
from bitblend.train.jacobian import aggregate_backward, make_aggregator
from bitblend.train.trainer import Trainer


def _recipe(tasks: list[dict], *overrides: str) -> object:
    data = {
        "name": "shares",
        "model": {"backbone": "tiny-bert", "max_length": 32, "dropout": 0.0, "head_dropout": 0.0},
        "tasks": tasks,
        "precision": {"recipe": "32-true"},
        "optimizer": {"lr": 2e-3},
        "mixing": {"batches": "mixed", "strategy": "proportional"},
        "train": {"steps": 3, "batch_size": 16, "eval_max_examples": 16, "threads": 2},
    }
    return recipe_from_dict(apply_overrides(data, list(overrides)))


BBC = {"name": "bbc", "data": "bbc_news", "max_examples": 240}
DIGITS = {"name": "digits", "data": "digits", "patch_size": 2, "max_examples": 80}


def _trainer(recipe: object, path: Path) -> Trainer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 16-mixed on CPU warns by design
        return Trainer(recipe, path, show_progress=False)  # type: ignore[arg-type]


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _mixed_step(trainer: Trainer) -> step_fn.StepLosses:
    cfg = trainer.recipe.train
    return step_fn.mixed(
        trainer.model, trainer.precision, trainer.balancer, trainer.tasks,
        trainer.mixture.allocate, 0, cfg.seed, cfg.batch_size, cfg.grad_accum, trainer.aggregator,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("method", ["upgrad", "pcgrad"])
def test_aggregator_heads_get_the_sum_paths_gradients(tmp_path: Path, method: str) -> None:
    """Proportional mixing (bbc 3/4, digits 1/4 of each batch): every head and adapter
    gets exactly the `sum` path's gradient; only the trunk's is aggregated."""
    ref = _trainer(_recipe([BBC, DIGITS]), tmp_path / "sum")
    agg = _trainer(_recipe([BBC, DIGITS], f"mixing.balancing={method}"), tmp_path / method)
    res = _mixed_step(ref)
    assert _mixed_step(agg).losses == res.losses  # same examples, same forward
    shares = {i: k / sum(res.examples.values()) for i, k in res.examples.items()}
    assert min(shares.values()) < 0.5  # unequal shares: the case the old rows got wrong
    a, b = _grads(ref), _grads(agg)
    heads = [n for n in a if not n.startswith("backbone.")]
    assert any(n.startswith("heads.digits") for n in heads)
    for name in heads:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.slow
def test_upgrad_of_agreeing_tasks_is_the_sum_path(tmp_path: Path) -> None:
    """Two copies of one task's loss (same batch, same head) never conflict: UPGrad must
    give the trunk the `sum` path's gradient too (a sum of projections, not their mean)."""
    trainer = _trainer(_recipe([BBC]), tmp_path / "r")
    task, model, precision = trainer.tasks[0], trainer.model, trainer.precision
    micro = step_fn.prepare(task, 0, np.arange(8), torch.Generator())
    shares = {0: 0.25, 1: 0.75}

    def parts() -> dict[int, torch.Tensor]:
        return {i: step_fn.loss_part(model, precision, task, micro, micro.items) for i in (0, 1)}

    precision.backward(Balancer("sum", [1.0, 2.0], 0.0).combine(parts(), shares))
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    aggregate_backward(model, precision, parts(), Balancer("upgrad", [1.0, 2.0], 0.0), shares,
                       make_aggregator("upgrad"))  # fmt: skip
    for name, p in model.named_parameters():
        if name in ref:
            torch.testing.assert_close(p.grad, ref[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.slow
def test_one_task_mixture_upgrad_is_the_sum_path(tmp_path: Path) -> None:
    """A one-task mixture under upgrad trains exactly as under sum."""
    a = _trainer(_recipe([BBC]), tmp_path / "sum")
    b = _trainer(_recipe([BBC], "mixing.balancing=upgrad"), tmp_path / "up")
    a.fit()
    b.fit()
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_uncertainty_gradient_is_unscaled_under_fp16(tmp_path: Path) -> None:
    """16-mixed multiplies the loss by 2^16 for backward; the log-variance's gradient must
    still be d/ds (exp(-s) L + s) = 1 - L at s = 0, as under 32-true."""
    recipe = _recipe([BBC], "precision.recipe=16-mixed", "mixing.balancing=uncertainty",
                     "mixing.batches=homogeneous")  # fmt: skip
    trainer = _trainer(recipe, tmp_path / "r")
    assert trainer.precision.scale_loss(torch.ones(())).item() == 65536.0
    res = step_fn.homogeneous(trainer.model, trainer.precision, trainer.balancer,
                              trainer.tasks, 0, 0, 0, 1)  # fmt: skip
    grad = trainer.balancer.log_vars.grad
    assert grad is not None
    assert grad[0].item() == pytest.approx(1.0 - res.losses[0], rel=1e-5)


@pytest.mark.slow
def test_skipped_step_leaves_no_uncertainty_gradient(tmp_path: Path) -> None:
    """A step skipped for a non-finite gradient must not add its log-variance gradient to
    the next step's."""
    recipe = _recipe([BBC], "mixing.balancing=uncertainty", "mixing.batches=homogeneous")
    trainer = _trainer(recipe, tmp_path / "r")
    weight = trainer.model.heads["bbc"][1].weight
    weight.register_hook(lambda g: g * math.inf if trainer.step == 0 else g)
    record = trainer.train_step()
    assert record["skipped"]
    assert torch.equal(trainer.balancer.log_vars.detach(), torch.zeros(1))  # not stepped
    res = step_fn.homogeneous(trainer.model, trainer.precision, trainer.balancer,
                              trainer.tasks, 0, 1, 0, 1)  # fmt: skip
    grad = trainer.balancer.log_vars.grad
    assert grad is not None
    assert grad[0].item() == pytest.approx(1.0 - res.losses[0], rel=1e-5)
