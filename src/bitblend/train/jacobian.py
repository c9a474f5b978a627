"""Gradient aggregation (UPGrad, PCGrad) through torchjd, an optional extra.

The trunk's gradient is the aggregation of the per-task gradients (the rows of the
Jacobian of the task losses); task-specific parameters (heads, adapters) get the plain
gradient of their own task's loss. Under 16-mixed every loss is multiplied by the loss
scale first, so the scaler's unscale/overflow check sees the usual scaled gradients.
"""

from __future__ import annotations

from typing import Any

import torch

from bitblend.errors import BitblendError
from bitblend.models.trunk import MultiTaskModel
from bitblend.precision.base import Precision
from bitblend.tasks.balancing import Balancer


def make_aggregator(name: str) -> Any:
    """torchjd's UPGrad or PCGrad aggregator."""
    try:
        from torchjd.aggregation import PCGrad, UPGrad

        return UPGrad() if name == "upgrad" else PCGrad()
    except ImportError:  # torchjd itself, or UPGrad's quadprog solver
        raise BitblendError(
            f"mixing.balancing: {name} needs torchjd with its solver "
            "(pip install 'torchjd[quadprog-projector]', or bitblend[mtl])"
        ) from None


def aggregate_backward(
    model: MultiTaskModel,
    precision: Precision,
    losses: dict[int, torch.Tensor],
    balancer: Balancer,
    shares: dict[int, float],
    aggregator: Any,
    grad_accum: int,
) -> None:
    """Accumulate aggregated trunk gradients and per-task head gradients into `.grad`."""
    from torchjd.autojac import backward, jac_to_grad

    order = sorted(losses)
    scaled = [precision.scale_loss(losses[i] * balancer.weights[i]) / grad_accum for i in order]
    trunk = [p for p in model.backbone.parameters() if p.requires_grad]
    # Parameters no task of this step used (e.g. word embeddings in an image-only step)
    # would make the Jacobian undefined; they simply get no gradient.
    used = _used(scaled, trunk)
    if used:
        backward(scaled, inputs=used, retain_graph=True)
        jac_to_grad(used, aggregator)
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
