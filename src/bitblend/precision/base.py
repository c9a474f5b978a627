"""The Precision protocol: the only hooks the trainer calls to do arithmetic in a format."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class StepResult:
    """What happened at one optimizer step."""

    stepped: bool  # False when non-finite gradients made the step skip
    grad_norm: float  # global norm of the (unscaled) gradients before clipping
    loss_scale: float | None  # the loss scale after this step (16-mixed), else None


class Precision(Protocol):
    """A precision recipe. Model code stays dtype-agnostic; everything numeric lives here."""

    name: str

    def convert_module(self, model: nn.Module) -> nn.Module:
        """Cast weights and install module rules (norms/heads in fp32); returns the model."""
        ...

    def optimizer_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The tensors the optimizer updates (fp32 master copies where the recipe keeps them)."""
        ...

    def forward_context(self) -> AbstractContextManager[Any]:
        """Context for forward passes (autocast for mixed recipes)."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss` (scaled by the loss scale where one exists)."""
        ...

    def optimizer_step(
        self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None
    ) -> StepResult:
        """Unscale, check, clip and apply the gradients; skips the step if any is non-finite."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Scaler and master-weight state, for checkpoints."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        ...

    def describe(self) -> dict[str, Any]:
        """What is actually used: name, compute/weight dtypes, scaler, module rules."""
        ...
