"""Loss balancing: how the per-task losses of a step become one scalar to backpropagate.

- `sum` / `static`: sum of tasks[i].weight x loss_i, each task's term weighted by its share of
  the step's examples (so a mixed batch's loss is the mean over its examples).
- `uncertainty` (Kendall, Gal & Cipolla 2018): sum of exp(-s_i) loss_i + s_i with a learned
  log-variance s_i per task.
- `famo` (Liu et al. 2023, "FAMO: Fast Adaptive Multitask Optimization"): task weights
  z = softmax(xi) on log-losses, xi updated so that every task's loss falls at a similar
  rate. The update uses the next observed losses of each task instead of a second forward
  pass on the same batch (the approximation the paper notes as cheap and effective).
- `upgrad` / `pcgrad`: gradient aggregation through torchjd, handled in `train/jacobian.py`.
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

    def combine(self, losses: dict[int, torch.Tensor], shares: dict[int, float]) -> torch.Tensor:
        """One scalar from {task index: mean loss} and {task index: share of the step}."""
        if self.method in ("sum", "static", "upgrad", "pcgrad"):
            return sum(
                (losses[i] * (self.weights[i] * shares[i]) for i in losses),
                torch.zeros((), device=next(iter(losses.values())).device),
            )
        if self.method == "uncertainty":
            s = self.log_vars.to(next(iter(losses.values())).device)
            return sum(
                (torch.exp(-s[i]) * losses[i] * self.weights[i] + s[i] for i in losses),
                torch.zeros((), device=s.device),
            )
        if self.method == "famo":
            idx = sorted(losses)
            z = F.softmax(self.xi[idx], dim=0).to(losses[idx[0]].device)
            d = torch.stack([losses[i] for i in idx]) + EPS
            for i in idx:
                self.prev[i] = float(losses[i].detach())
            c = (z / d).sum().detach()
            return (torch.log(d) * z / c).sum()
        raise ValueError(f"unknown balancing {self.method!r}")

    def famo_update(self, before: dict[int, float], after: dict[int, float]) -> None:
        """Move xi by the observed log-loss decrease of each task (famo only)."""
        idx = sorted(set(before) & set(after))
        if self.method != "famo" or len(idx) < 2 or self.optimizer is None:
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
