"""Step health: where a non-finite gradient first appeared; a stuck loss scale or a run of
non-finite steps that stops the run.

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


class NonFiniteStuck(BitblendError):
    """Every step for `precision.stuck_steps` steps had non-finite gradients: the weights or
    the inputs hold inf/NaN and no step can recover them."""


class NonFiniteSteps:
    """Counts consecutive skipped (non-finite) steps in any recipe and stops a stuck run.

    Without it a 32-true or bf16 run whose weights went NaN skips every remaining step,
    exits 0 and saves a NaN model. 16-mixed is left to its own loss-scale check
    (StepHealth.check_scale): there a skipped step is how the scaler searches for a scale,
    so skips in a row are normal for a while, and when they never stop the scale falls
    under precision.min_loss_scale and that check stops the run with the fp16 diagnosis.
    """

    def __init__(self, recipe: str, stuck_steps: int) -> None:
        self.recipe = recipe
        self.stuck_steps = stuck_steps
        self.run = 0  # consecutive skipped steps up to now
        self.first_step = 0  # the first step of that run (1-based)
        self.first_module: str | None = None  # where the first of them went non-finite

    def observe(self, step: int, stepped: bool, module: str | None) -> None:
        """Record whether optimizer step `step` (1-based) was taken; `module` is the
        first non-finite module of a skipped step."""
        if stepped:
            self.run, self.first_module = 0, None
            return
        if self.run == 0:
            self.first_step, self.first_module = step, module
        self.run += 1

    def check(self) -> None:
        """Stop the run (NonFiniteStuck) once `stuck_steps` steps in a row were skipped."""
        if self.stuck_steps <= 0 or self.run < self.stuck_steps or self.recipe == "16-mixed":
            return
        last = self.first_step + self.run - 1
        raise NonFiniteStuck(
            f"{self.recipe}: {self.run} steps in a row had non-finite gradients (steps "
            f"{self.first_step}-{last}), first in {self.first_module or 'an unknown module'}; "
            f"stopped at precision.stuck_steps {self.stuck_steps}, no model saved. The weights "
            "or inputs hold inf/NaN: lower optimizer.lr, keep train.max_grad_norm set, or look "
            "for extreme values in the data"
        )

    def state_dict(self) -> dict[str, Any]:
        """The current run of skipped steps (a resumed run keeps counting it)."""
        return {"run": self.run, "first_step": self.first_step, "first_module": self.first_module}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (older checkpoints have none: a zero run)."""
        self.run = int(state.get("run", 0))
        self.first_step = int(state.get("first_step", 0))
        self.first_module = state.get("first_module")
