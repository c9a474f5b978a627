"""The part of the optimizer step every precision recipe shares, composed into each of them.

An `Updater` knows the tensors the optimizer updates (by model parameter name) and does what
is the same in every recipe: one global gradient norm (the one host sync per step, needed
to decide skipping), attribution of a non-finite gradient to its module, clipping, bf16
optimizer states at rest (`state_bits` 16), skipping, and the stuck-loss-scale check.
A recipe wraps it with what is its own: unscaling (16-mixed), fp32 masters (bf16-true).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bitblend.config.schema import PrecisionConfig
from bitblend.errors import BitblendError
from bitblend.optim.lowbit import state_bytes
from bitblend.precision.base import StepResult
from bitblend.precision.base_weights import weight_bytes
from bitblend.precision.health import StepHealth


@dataclass
class GradCheck:
    """The gradients of one step, as measured before the update."""

    grad_norm: float
    finite: bool
    nonfinite_module: str | None  # where a non-finite gradient first appeared


class Updater:
    """Gradient checks, clipping and state-width handling around `optimizer.step()`."""

    def __init__(self, cfg: PrecisionConfig) -> None:
        self.health = StepHealth(cfg.min_loss_scale, cfg.stuck_steps)
        self.state_bits = cfg.state_bits
        self.names: list[str] = []  # model parameter name of each optimizer parameter
        self.params: list[nn.Parameter] = []  # what the optimizer updates
        self.grad_bytes = 0  # bytes of the gradients of all trainable weights

    def attach(self, model: nn.Module) -> None:
        """Hook the model's parameters to record backward order (for attribution)."""
        self.health.attach(model)

    def bind(self, named: list[tuple[str, nn.Parameter]], params: list[nn.Parameter]) -> None:
        """Remember the optimizer's tensors `params`, one per trainable model parameter."""
        self.names = [n for n, _ in named]
        self.params = params
        # autograd gives each weight a gradient of its own dtype: bytes after a full backward.
        self.grad_bytes = sum(nbytes(p) for _, p in named)

    def check_and_clip(self, max_grad_norm: float | None) -> GradCheck:
        """Global norm of the optimizer tensors' gradients; clip them when it is finite."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        # FSDP2: a replicated DTensor over the shards' norms; clipping takes it as it is.
        whole = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        grad_norm = float(whole)  # the one host sync per step: needed to decide skipping
        finite = math.isfinite(grad_norm)
        # Attribute before clipping: clipping by an inf norm turns every gradient into nan.
        where = None
        if not finite:
            by_name = {n: q.grad for n, q in zip(self.names, self.params, strict=True)}
            where = self.health.first_nonfinite(by_name)
        if finite and max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, max_grad_norm, norm, foreach=True)
        return GradCheck(grad_norm, finite, where)

    def apply(self, optimizer: torch.optim.Optimizer, step: Callable[[], object]) -> None:
        """Run `step` (the optimizer's update), with 16-bit states widened around it.

        state_bits 16 stores states in bf16 between steps and widens them for the update, so
        any torch optimizer (fused kernels included, which need states in the param dtype)
        works.
        """
        if self.state_bits == 16:
            _states_to(optimizer, torch.float32)
        step()
        if self.state_bits == 16:
            _states_to(optimizer, torch.bfloat16)

    def finish(self, check: GradCheck, scale: float | None) -> StepResult:
        """End the step: forget its backward order, count a stuck loss scale."""
        self.health.reset()
        self.health.check_scale(scale)
        return StepResult(check.finite, check.grad_norm, scale, check.nonfinite_module)

    def state_bytes(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Bytes of weights, their gradients and the optimizer's states."""
        weights = weight_bytes(model)  # a low-bit frozen base counts its codes and scales
        return weights + self.grad_bytes + state_bytes(optimizer)

    def state_dict(self, name: str) -> dict[str, Any]:
        """The recipe's name (checked on load) and the stuck-scale counter."""
        return {"name": name, "health": self.health.state_dict()}

    def load_state_dict(self, state: dict[str, Any], name: str) -> None:
        """Refuse a checkpoint of another recipe; restore the stuck-scale counter."""
        if state.get("name") != name:
            raise BitblendError(
                f"checkpoint was written with precision {state.get('name')!r}, "
                f"the recipe asks for {name!r}"
            )
        self.health.load_state_dict(state.get("health", {}))


def nbytes(t: torch.Tensor) -> int:
    """Bytes of `t`'s elements."""
    return t.numel() * t.element_size()


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The model's trainable parameters with their names, in `named_parameters` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _states_to(optimizer: torch.optim.Optimizer, dtype: torch.dtype) -> None:
    """Cast every full-size floating optimizer state (moments, momentum) to `dtype`."""
    for p, per_param in optimizer.state.items():
        for key, value in per_param.items():
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and value.shape == p.shape
                and value.numel() > 1
                and value.dtype != dtype
            ):
                per_param[key] = value.to(dtype)
