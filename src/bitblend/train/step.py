"""Forward and backward of one optimizer step, homogeneous or mixed, plus diagnostics.

Homogeneous: the step trains one task on `grad_accum` equal micro-batches. Mixed: every
micro-batch holds examples of several tasks (counts from the mixture); each task's part
runs through its own adapters and head, and the balancer combines the task losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from bitblend.models.trunk import MultiTaskModel
from bitblend.precision.recipes import PrecisionRecipe
from bitblend.tasks.balancing import Balancer
from bitblend.tasks.losses import compute_loss
from bitblend.train.setup import TaskRuntime


@dataclass
class StepLosses:
    """Per-task mean losses and token counts of one step."""

    losses: dict[int, float] = field(default_factory=dict)
    examples: dict[int, int] = field(default_factory=dict)
    tokens: int = 0


def _generator(seed: int, step: int, task: int, micro: int) -> torch.Generator:
    # MLM masking draws from its own generator, a function of (seed, step, task, micro):
    # resume reproduces the masks and dropout's global RNG is left alone.
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 131 + task) * 17 + micro)


def task_loss(
    model: MultiTaskModel,
    precision: PrecisionRecipe,
    task: TaskRuntime,
    idx: np.ndarray,
    gen: torch.Generator,
) -> torch.Tensor:
    """Mean loss of `task` on the examples `idx` (forward in the precision's context)."""
    batch = task.batch.collate(task.train, idx, gen)
    with precision.forward_context():
        logits = model(task.name, **batch)
    loss = compute_loss(task.loss, logits, batch["labels"], task.cfg.head)
    if task.distill_loss is not None:  # `bitblend distill`: mix in the teacher's soft targets
        loss = task.distill_loss(logits, loss, idx)
    return loss


def homogeneous(
    model: MultiTaskModel,
    precision: PrecisionRecipe,
    balancer: Balancer,
    tasks: list[TaskRuntime],
    task_idx: int,
    step: int,
    seed: int,
    grad_accum: int,
) -> StepLosses:
    """One task, `grad_accum` equal micro-batches; gradients accumulate in the model."""
    task = tasks[task_idx]
    indices = task.sampler.next()
    out = StepLosses(tokens=int(task.train.lengths[indices].sum()))
    total = 0.0
    for m, micro in enumerate(np.split(indices, grad_accum)):
        loss = task_loss(model, precision, task, micro, _generator(seed, step, task_idx, m))
        combined = balancer.combine({task_idx: loss}, {task_idx: 1.0})
        precision.backward(combined / grad_accum)
        total += float(loss.detach())
    out.losses[task_idx] = total / grad_accum
    out.examples[task_idx] = len(indices)
    return out


def mixed(
    model: MultiTaskModel,
    precision: PrecisionRecipe,
    balancer: Balancer,
    tasks: list[TaskRuntime],
    allocate: Any,
    step: int,
    seed: int,
    batch_size: int,
    grad_accum: int,
    aggregator: Any = None,
) -> StepLosses:
    """Several tasks per micro-batch, as many examples of each as `allocate` says."""
    out = StepLosses()
    sums: dict[int, float] = {}
    for m in range(grad_accum):
        counts = allocate(step * grad_accum + m, batch_size)
        losses: dict[int, torch.Tensor] = {}
        shares: dict[int, float] = {}
        # Under torchrun `counts` are global and `take` returns this rank's part (k_r of k).
        # DDP/FSDP average gradients over W ranks, so a rank's mean loss is scaled by
        # k_r W / k: the average over ranks is then the mean over all k examples, exactly
        # the one-process loss. A rank left with no example of a task still runs it on one
        # example weighted 0, so every rank's backward touches the same parameters.
        dummy: torch.Tensor | None = None
        for i, k in enumerate(counts):
            if k <= 0:
                continue
            world = tasks[i].sampler.world_size
            idx = tasks[i].sampler.take(int(k))
            if len(idx) == 0:
                zero = task_loss(model, precision, tasks[i], np.zeros(1, np.int64),
                                 _generator(seed, step, i, m)) * 0.0  # fmt: skip
                if balancer.method == "uncertainty":
                    # its + s_i term counts on every rank, as in one process: pass the 0
                    losses[i], shares[i] = zero, k / batch_size
                else:  # outside the balancer (famo's log-loss would take 0 as a loss)
                    dummy = zero if dummy is None else dummy + zero
                continue
            loss = task_loss(model, precision, tasks[i], idx, _generator(seed, step, i, m))
            losses[i] = loss if world == 1 else loss * (len(idx) * world / k)
            shares[i] = k / batch_size
            out.tokens += int(tasks[i].train.lengths[idx].sum())
            out.examples[i] = out.examples.get(i, 0) + len(idx)
            sums[i] = sums.get(i, 0.0) + float(loss.detach()) * len(idx)
        if aggregator is not None and len(losses) > 1:
            from bitblend.train.jacobian import aggregate_backward

            aggregate_backward(model, precision, losses, balancer, shares, aggregator, grad_accum)
        elif losses:
            combined = balancer.combine(losses, shares)
            precision.backward((combined if dummy is None else combined + dummy) / grad_accum)
        elif dummy is not None:
            precision.backward(dummy)
    # Example-weighted mean of each task's loss over the step (equal to the mean of the
    # micro-batch means when every micro-batch holds the same count of the task).
    out.losses = {i: s / out.examples[i] for i, s in sums.items()}
    return out


def trunk_parameters(model: MultiTaskModel) -> list[nn.Parameter]:
    """Parameters shared by every task: the backbone's."""
    return [p for p in model.backbone.parameters() if p.requires_grad]


def gradient_cosines(
    model: MultiTaskModel, precision: PrecisionRecipe, tasks: list[TaskRuntime]
) -> dict[str, float]:
    """Cosine similarity of every pair of tasks' trunk gradients on a fixed eval batch.

    Runs in eval mode (no dropout, no RNG draws) after the step's gradients were cleared,
    and clears its own gradients afterwards, so training is not affected.
    """
    params = trunk_parameters(model)
    grads: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        for i, task in enumerate(tasks):
            idx = np.arange(min(len(task.eval), task.batch_size))
            batch = task.batch.collate(task.eval, idx, _generator(0, 0, i, 0))
            with precision.forward_context():
                logits = model(task.name, **batch)
            loss = compute_loss(task.loss, logits, batch["labels"], task.cfg.head)
            g = torch.autograd.grad(loss, params, allow_unused=True)
            flat = [
                (x if x is not None else torch.zeros_like(p)).float().flatten()
                for x, p in zip(g, params, strict=True)
            ]
            grads.append(torch.cat(flat))
    finally:
        model.train(was_training)
    out = {}
    for a in range(len(tasks)):
        for b in range(a + 1, len(tasks)):
            cos = torch.nn.functional.cosine_similarity(grads[a], grads[b], dim=0)
            out[f"{tasks[a].name}|{tasks[b].name}"] = float(cos)
    return out
