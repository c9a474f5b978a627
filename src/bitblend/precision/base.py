"""The Precision protocol: the only hooks the trainer, the step, doctor and inference call to
do arithmetic in a format. One class per mode family implements it (full.py, mixed.py,
half.py); `recipes.build_precision` picks the class, and callers type against `Precision`."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from bitblend.precision.state_bits import resolve_state_bits


@dataclass
class StepResult:
    """What happened at one optimizer step."""

    stepped: bool  # False when non-finite gradients made the step skip
    grad_norm: float  # global norm of the (unscaled) gradients before clipping
    loss_scale: float | None  # the loss scale after this step (16-mixed), else None
    # Skipped steps: the module whose gradient went non-finite first in backward order.
    nonfinite_module: str | None = None


class Precision(Protocol):
    """A precision recipe. Model code stays dtype-agnostic; everything numeric lives here."""

    @property
    def name(self) -> str:
        """The concrete recipe in use (`auto` already resolved), e.g. `bf16-mixed`."""
        ...

    @property
    def transient_bytes(self) -> int:
        """Bytes of fp32 copies alive only inside the last optimizer step (0 for most)."""
        ...

    def convert_module(self, model: nn.Module) -> nn.Module:
        """Place and cast weights, install module rules (norms/heads in fp32); returns the model."""
        ...

    def optimizer_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The tensors the optimizer updates, one per trainable model parameter in
        `named_parameters` order (fp32 master copies where the recipe keeps them)."""
        ...

    def forward_context(self) -> AbstractContextManager[Any]:
        """Context for forward passes (autocast for mixed recipes)."""
        ...

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` times the loss scale where one exists, for custom backward passes."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss` (scaled by the loss scale where one exists)."""
        ...

    def optimizer_step(
        self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None
    ) -> StepResult:
        """Unscale, check, clip and apply the gradients; skips the step if any is non-finite."""
        ...

    def model_state_bytes(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Bytes of model state at rest: weights, gradients, masters, compensation, states."""
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

    def fsdp_policies(self) -> tuple[Any, Any]:
        """FSDP2 MixedPrecisionPolicy of (blocks and root, fp32-kept modules); see fsdp.py."""
        ...


def description(
    name: str,
    requested: str,
    device: torch.device,
    *,
    compute: torch.dtype,
    weights: torch.dtype,
    state_bits: int | str,
    master_weights: bool = False,
    rounding: str = "nearest",
    loss_scaler: bool = False,
    fp32_modules: int = 0,
    fp8_modules: int = 0,
    base_bits: int | None = None,
) -> dict[str, Any]:
    """The `describe()` record every recipe writes to logs and summary.json (same keys)."""
    return {
        "recipe": name,
        "requested": requested,
        "device": str(device),
        "compute_dtype": str(compute).replace("torch.", ""),
        "weight_dtype": str(weights).replace("torch.", ""),
        "master_weights": master_weights,
        "rounding": rounding,
        "state_bits": resolve_state_bits(state_bits, device.type),
        "loss_scaler": loss_scaler,
        "fp32_modules": fp32_modules,
        "fp8_modules": fp8_modules,
        # model.adapter: bits of the frozen backbone's Linear weights (None = as `weights`)
        "base_bits": base_bits,
    }
