"""Gradient aggregation (UPGrad, PCGrad) through torchjd, an optional extra.

The rows aggregated are the per-task terms of the `sum` path (`Balancer.weighted`: weight x
share of the step's examples x the micro-batch's part of the task's mean loss), so on tasks
whose gradients do not conflict the trunk gets the `sum` path's gradient, and task-specific
parameters (heads, adapters) always get exactly the `sum` path's gradient: the gradient of
their own task's term. UPGrad combines the projected rows with a preference vector of ones
(a sum, as PCGrad does) rather than torchjd's default mean, which would shrink the trunk's
gradient by the number of tasks against the heads'. Under 16-mixed every term is multiplied
by the loss scale first, so the scaler's unscale/overflow check sees the usual gradients.
"""

from __future__ import annotations

from typing import Any

import torch

from bitblend.errors import BitblendError
from bitblend.models.trunk import MultiTaskModel
from bitblend.precision.base import Precision
from bitblend.tasks.balancing import Balancer


class Aggregation:
    """torchjd's UPGrad or PCGrad, one aggregator per number of rows (UPGrad's preference
    vector has one entry per row)."""

    def __init__(self, name: str) -> None:
        try:
            from torchjd.aggregation import PCGrad, UPGrad

            UPGrad(pref_vector=torch.ones(2))  # needs the quadprog solver: fail here, not mid-run
        except ImportError:  # torchjd itself, or UPGrad's quadprog solver
            raise BitblendError(
                f"mixing.balancing: {name} needs torchjd with its solver "
                "(pip install 'torchjd[quadprog-projector]', or bitblend[mtl])"
            ) from None
        self.name = name
        self._upgrad = UPGrad
        self._pcgrad = PCGrad()
        self._cache: dict[int, Any] = {}

    def __call__(self, rows: int) -> Any:
        """The torchjd aggregator for a Jacobian of `rows` rows."""
        if self.name == "pcgrad":
            return self._pcgrad
        if rows not in self._cache:
            self._cache[rows] = self._upgrad(pref_vector=torch.ones(rows))
        return self._cache[rows]


def make_aggregator(name: str) -> Aggregation:
    """UPGrad or PCGrad for `mixing.balancing`; a one-line error when torchjd is missing."""
    return Aggregation(name)


def aggregate_backward(
    model: MultiTaskModel,
    precision: Precision,
    losses: dict[int, torch.Tensor],
    balancer: Balancer,
    shares: dict[int, float],
    aggregator: Aggregation,
) -> None:
    """Accumulate aggregated trunk gradients and per-task head gradients into `.grad`.

    losses: {task: this micro-batch's part of its step-mean loss}; shares: {task: its
    share of the step's examples} (as `Balancer.combine` takes them).
    """
    from torchjd.autojac import backward, jac_to_grad

    order = sorted(losses)
    terms = balancer.weighted(losses, shares)
    scaled = [precision.scale_loss(terms[i]) for i in order]
    trunk = [p for p in model.backbone.parameters() if p.requires_grad]
    # Parameters no task of this step used (e.g. word embeddings in an image-only step)
    # would make the Jacobian undefined; they simply get no gradient.
    used = _used(scaled, trunk)
    if used:
        backward(scaled, inputs=used, retain_graph=True)
        jac_to_grad(used, aggregator(len(scaled)))
    rest = [
        p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")
    ]
    rest_used = _used([sum(scaled, torch.zeros(()))], rest)
    if rest_used:
        torch.autograd.backward(sum(scaled, torch.zeros(())), inputs=rest_used)


def _used(
    outputs: list[torch.Tensor], params: list[torch.nn.Parameter]
) -> list[torch.nn.Parameter]:
    total = sum(outputs, torch.zeros(()))
    grads = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
    return [p for p, g in zip(params, grads, strict=True) if g is not None]
