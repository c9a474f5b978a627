"""The same tiny training steps on CUDA and on CPU (skipped without a CUDA device).

tests/conftest.py skips every `gpu`-marked test when torch sees no CUDA device, so the
suite passes on CPU-only machines and these run wherever a GPU is present.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitblend.train.trainer import Trainer
from tests.conftest import make_recipe

pytestmark = pytest.mark.gpu

Weights = dict[str, torch.Tensor]


def _weights(trainer: Trainer) -> Weights:
    return {k: v.detach().float().cpu().clone() for k, v in trainer.model.state_dict().items()}


def _steps(device: str, precision: str, run: Path) -> tuple[list[float], Weights, Weights]:
    """(losses of 3 steps, weights before, weights after) on `device`."""
    # No dropout: CPU and CUDA draw different masks from the same seed.
    recipe = make_recipe(f"precision.recipe={precision}", f"train.device={device}",
                         "model.dropout=0", "model.head_dropout=0", "train.steps=3")  # fmt: skip
    trainer = Trainer(recipe, run, show_progress=False)
    before = _weights(trainer)
    losses = [trainer.train_step()["loss"] for _ in range(3)]
    return losses, before, _weights(trainer)


@pytest.mark.parametrize(("precision", "tol"), [("32-true", 1e-4), ("bf16-mixed", 3e-2)])
def test_tiny_training_steps_on_cuda_equal_cpu(precision: str, tol: float, tmp_path: Path) -> None:
    """Same init (built on CPU, then moved), data order and arithmetic up to the kernels:
    losses and weights after 3 AdamW steps agree within the precision's tolerance."""
    cpu_losses, cpu_init, cpu_w = _steps("cpu", precision, tmp_path / "cpu")
    gpu_losses, gpu_init, gpu_w = _steps("cuda", precision, tmp_path / "cuda")
    for name, w in cpu_init.items():
        assert torch.equal(gpu_init[name], w), name  # one init on both devices
    assert gpu_losses == pytest.approx(cpu_losses, rel=tol)
    moved = [n for n in cpu_w if not torch.equal(cpu_w[n], cpu_init[n])]
    assert len(moved) > 0.9 * len(cpu_w)  # the steps trained: the comparison is not trivial
    for name, w in cpu_w.items():
        torch.testing.assert_close(gpu_w[name], w, rtol=tol, atol=tol, msg=name)
