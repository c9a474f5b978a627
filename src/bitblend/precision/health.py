"""Step health: where a non-finite gradient first appeared, and a loss scale that is stuck.

Attribution is cheap: a post-accumulate-grad hook on every parameter appends its name to a
list as backward produces it (no device sync, no tensor work). Only when a step turns out
non-finite is that list walked, in backward order, to find the first parameter whose
gradient holds inf/nan; its module is reported. Healthy steps pay one list append per
parameter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bitblend.errors import BitblendError


class LossScaleStuck(BitblendError):
    """16-mixed's loss scale stayed below its floor: fp16 cannot represent this run."""


class StepHealth:
    """Backward-order hooks for attribution plus the stuck-loss-scale counter."""

    def __init__(self, min_loss_scale: float, stuck_steps: int) -> None:
        self.min_loss_scale = min_loss_scale
        self.stuck_steps = stuck_steps
        self.low_steps = 0  # consecutive steps with the scale below min_loss_scale
        self._order: list[str] = []
        self._handles: list[Any] = []

    def attach(self, model: nn.Module) -> None:
        """Hook every trainable parameter to record the order backward reaches it."""
        for name, p in model.named_parameters():
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def record(_: torch.Tensor) -> None:
            self._order.append(name)

        return record

    def reset(self) -> None:
        """Forget the order of the step that just ended."""
        self._order.clear()

    def first_nonfinite(self, grads: dict[str, torch.Tensor | None]) -> str | None:
        """The module (parameter name minus its last part) whose gradient went non-finite
        first in backward order, given the step's gradients by parameter name."""
        seen = set()
        for name in self._order + sorted(grads):  # unhooked ones (none expected) last
            if name in seen:
                continue
            seen.add(name)
            g = grads.get(name)
            if g is not None and not bool(torch.isfinite(g).all()):
                return name.rsplit(".", 1)[0] if "." in name else name
        return None

    def check_scale(self, scale: float | None) -> None:
        """Count steps with the loss scale under the floor; stop the run after too many."""
        if scale is None or self.stuck_steps <= 0:
            return
        self.low_steps = self.low_steps + 1 if scale < self.min_loss_scale else 0
        if self.low_steps >= self.stuck_steps:
            raise LossScaleStuck(
                f"16-mixed: loss scale stayed below precision.min_loss_scale "
                f"{self.min_loss_scale:g} for {self.low_steps} steps (now {scale:g}); fp16 "
                "overflows on every step. Use precision.recipe bf16-mixed (same speed where bf16 "
                "is native, no loss scale), or find the module named in the skipped-step logs"
            )

    def state_dict(self) -> dict[str, Any]:
        """The stuck counter (hooks are rebuilt from the model)."""
        return {"low_steps": self.low_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the stuck counter."""
        self.low_steps = int(state.get("low_steps", 0))
