"""Loss balancing: how the per-task losses of a step become one scalar to backpropagate.

- `sum` / `static`: sum of tasks[i].weight x loss_i, each task's term weighted by its share of
  the step's examples (so a mixed batch's loss is the mean over its examples).
- `uncertainty` (Kendall, Gal & Cipolla 2018): sum of exp(-s_i) loss_i + s_i with a learned
  log-variance s_i per task.
- `famo` (Liu et al. 2023, "FAMO: Fast Adaptive Multitask Optimization"): task weights
  z = softmax(xi) on log-losses, xi updated so that every task's loss falls at a similar
  rate. The update uses the next observed losses of each task instead of a second forward
  pass on the same batch (the approximation the paper notes as cheap and effective).
- `upgrad` / `pcgrad`: gradient aggregation through torchjd, handled in `train/jacobian.py`;
  the rows it aggregates are the `sum` path's weighted terms (`weighted`), so heads get
  exactly the `sum` path's gradients.

One call per micro-batch. `losses[i]` is micro-batch's part of task i's mean loss over the
whole optimizer step (the parts of a step add up to that mean, see train/step.py), so the
results of a step's calls add up to the step's combined loss, however it was split.

The learned weights (uncertainty's log-variances, FAMO's logits) never enter the model's
backward: their gradients would then carry the fp16 loss scale, and a skipped step's
gradients would leak into the next. Uncertainty's gradient is accumulated here from the
detached losses, unscaled; `zero_grad` at the start of every step drops what a skipped
step left.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-8


class Balancer:
    """Combines per-task losses; owns any learned balancing weights and their optimizer."""

    def __init__(self, method: str, weights: list[float], lr: float) -> None:
        self.method = method
        self.weights = weights
        k = len(weights)
        self.log_vars = nn.Parameter(torch.zeros(k))
        self.xi = nn.Parameter(torch.zeros(k))
        self.optimizer: torch.optim.Optimizer | None = None
        if method == "uncertainty":
            self.optimizer = torch.optim.Adam([self.log_vars], lr=lr)
        elif method == "famo":
            # weight_decay pulls the logits back toward uniform, as in the FAMO reference code.
            self.optimizer = torch.optim.Adam([self.xi], lr=lr, weight_decay=1e-3)
        self.prev: dict[int, float] = {}  # famo: last loss seen per task

    def weighted(
        self, losses: dict[int, torch.Tensor], shares: dict[int, float]
    ) -> dict[int, torch.Tensor]:
        """Each task's term of the `sum` path: weight x share of the step x loss part."""
        return {i: losses[i] * (self.weights[i] * shares[i]) for i in losses}

    def combine(
        self,
        losses: dict[int, torch.Tensor],
        shares: dict[int, float],
        fractions: dict[int, float] | None = None,
    ) -> torch.Tensor:
        """The scalar to backpropagate for one micro-batch.

        losses: {task: this micro-batch's part of the task's step-mean loss}; shares: {task:
        its share of the step's examples}; fractions: {task: this micro-batch's share of the
        task's loss items in the step} (all 1.0 when omitted: a step of one micro-batch).
        """
        frac = fractions if fractions is not None else dict.fromkeys(losses, 1.0)
        zero = torch.zeros((), device=next(iter(losses.values())).device)
        if self.method in ("sum", "static", "upgrad", "pcgrad"):
            return sum(self.weighted(losses, shares).values(), zero)
        if self.method == "uncertainty":
            # d/ds_i of exp(-s_i) w_i L_i + s_i, this micro-batch's part of it, unscaled.
            s = self.log_vars.to(zero.device)
            own = sum(
                (torch.exp(-s[i]) * losses[i].detach() * self.weights[i] + s[i] * frac[i]
                 for i in losses),
                zero,
            )  # fmt: skip
            own.backward()
            w = torch.exp(-s.detach())
            return sum((losses[i] * (w[i] * self.weights[i]) for i in losses), zero)
        if self.method == "famo":
            # FAMO's gradient is sum_i z_i / (c d_i) grad L_i with d_i the task's loss and
            # c = sum_i z_i / d_i. Linear in the losses, so the micro-batch parts add up; d_i
            # is this micro-batch's estimate (part / fraction = its own mean loss).
            idx = [i for i in sorted(losses) if frac[i] > 0]
            if not idx:
                return sum(losses.values(), zero)  # nothing labelled: a zero gradient
            z = F.softmax(self.xi.detach()[idx], dim=0).to(zero.device)
            d = torch.stack([losses[i].detach() / frac[i] for i in idx]) + EPS
            coef = z / d / (z / d).sum()
            return sum((losses[i] * coef[j] for j, i in enumerate(idx)), zero)
        raise ValueError(f"unknown balancing {self.method!r}")

    def zero_grad(self) -> None:
        """Drop gradients of the learned weights (called at the start of every step, so a
        skipped step's never reach the next)."""
        self.log_vars.grad = None
        self.xi.grad = None

    def famo_update(self, before: dict[int, float], after: dict[int, float]) -> None:
        """Move xi by the observed log-loss decrease of each task (famo only)."""
        if self.method != "famo":
            return
        self.prev.update(after)  # each task's mean loss over the step just taken
        idx = sorted(set(before) & set(after))
        if len(idx) < 2 or self.optimizer is None:
            return
        delta = torch.tensor([
            torch.log(torch.tensor(before[i] + EPS)) - torch.log(torch.tensor(after[i] + EPS))
            for i in idx
        ])  # fmt: skip
        with torch.enable_grad():
            z = F.softmax(self.xi[idx], dim=0)
            (grad,) = torch.autograd.grad(z, self.xi, grad_outputs=delta)
        self.optimizer.zero_grad()
        self.xi.grad = grad
        self.optimizer.step()

    def step(self) -> None:
        """After a taken optimizer step: update learned uncertainty weights."""
        if self.method == "uncertainty" and self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def task_weights(self) -> list[float]:
        """The current effective weight of each task (for logs)."""
        if self.method == "uncertainty":
            return [
                float(torch.exp(-v)) * w
                for v, w in zip(self.log_vars.detach(), self.weights, strict=True)
            ]
        if self.method == "famo":
            return F.softmax(self.xi.detach(), dim=0).tolist()
        return list(self.weights)

    def state_dict(self) -> dict[str, Any]:
        """Learned weights, their optimizer, and FAMO's last losses."""
        return {
            "log_vars": self.log_vars.detach().clone(),
            "xi": self.xi.detach().clone(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "prev": {str(k): v for k, v in self.prev.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`."""
        with torch.no_grad():
            self.log_vars.copy_(state["log_vars"])
            self.xi.copy_(state["xi"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.prev = {int(k): float(v) for k, v in state["prev"].items()}
