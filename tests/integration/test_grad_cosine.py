"""The gradient-conflict probe (mixing.grad_cosine_every) against first principles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitblend.config.load import recipe_from_dict
from bitblend.tasks.losses import compute_loss
from bitblend.train import step as step_fn
from bitblend.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict

# Builds a two-task Trainer (text + images): over 2 s on 2 CPU cores.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    """Text (BBC News) and image (digits) tasks on one tiny-bert trunk; nothing trained."""
    data = tiny_recipe_dict(model={"max_length": 16})
    data["tasks"] = [
        {"name": "bbc", "data": "bbc_news", "max_examples": 64},
        {"name": "digits", "data": "digits", "patch_size": 2, "max_examples": 64},
    ]
    return Trainer(recipe_from_dict(data), tmp_path_factory.mktemp("cos") / "run",
                   show_progress=False)  # fmt: skip


def _trunk_gradient(trainer: Trainer, i: int) -> torch.Tensor:
    """Task i's loss gradient w.r.t. every trunk parameter, flattened, on the probe's batch
    (the first batch_size eval examples), in eval mode."""
    task = trainer.tasks[i]
    params = step_fn.trunk_parameters(trainer.model)
    batch = task.batch.collate(task.eval, np.arange(min(len(task.eval), task.batch_size)))
    trainer.model.eval()
    try:
        loss = compute_loss(task.loss, trainer.model(task.name, **batch), batch["labels"])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        trainer.model.train()
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double()
                      for g, p in zip(grads, params, strict=True)])  # fmt: skip


def test_cosine_equals_first_principles_and_is_one_with_itself(trainer: Trainer) -> None:
    bbc, digits = trainer.tasks
    got = step_fn.gradient_cosines(trainer.model, trainer.precision, [bbc, digits, bbc])
    assert got["bbc|bbc"] == pytest.approx(1.0, abs=1e-5)
    a, b = _trunk_gradient(trainer, 0), _trunk_gradient(trainer, 1)
    want = float(a @ b / (a.norm() * b.norm()))
    assert got["bbc|digits"] == pytest.approx(want, abs=1e-5)
    assert got["digits|bbc"] == pytest.approx(want, abs=1e-5)
    assert abs(want) > 1e-4  # the tasks share the encoder: a value, not an accidental zero


def test_probe_leaves_no_trace_on_training(trainer: Trainer) -> None:
    """No gradients left behind, train mode restored, no random numbers drawn."""
    rng = torch.get_rng_state()
    trainer.model.train()
    step_fn.gradient_cosines(trainer.model, trainer.precision, trainer.tasks)
    assert trainer.model.training
    assert all(p.grad is None for p in trainer.model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
