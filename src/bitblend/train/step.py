"""Forward and backward of one optimizer step, homogeneous or mixed, plus diagnostics.

Homogeneous: the step trains one task on `grad_accum` equal micro-batches. Mixed: every
micro-batch holds examples of several tasks (counts from the mixture); each task's part
runs through its own adapters and head, and the balancer combines the task losses.

Every micro-batch of the step is collated before the first forward, so each task's loss
items over the whole step (labelled tokens for token-level heads, examples otherwise) are
known up front, as transformers' Trainer counts `num_items_in_batch`. Each micro-batch then
contributes its part of the task's step-mean loss (token sum / the step's tokens; pooled
heads: batch mean x its share of the step's examples), so 4 micro-batches of 2 give the
gradient of one batch of 8 for every head, however ragged the sequences. The inputs of a
whole step are held at once (token ids and small tensors; activations stay per micro-batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from bitblend.models.trunk import MultiTaskModel
from bitblend.precision.base import Precision
from bitblend.tasks.balancing import Balancer
from bitblend.tasks.losses import TOKEN_HEADS, compute_loss, loss_items
from bitblend.train.jacobian import aggregate_backward
from bitblend.train.setup import TaskRuntime

# Sums integer counts over the ranks (DistContext.sum_counts); identity in one process.
Counter = Callable[[list[int]], list[int]]


def _local(values: list[int]) -> list[int]:
    return values


def _accumulating(model: Any, last: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP all-reduces gradients in every backward; accumulation needs the sum only once.
    All but the last micro-batch of a step run under DDP's `no_sync` (forward and backward:
    DDP decides in forward), their gradients add up locally and the last backward
    all-reduces the sum. The bare model (one process, fsdp2, mixed batches) has no no_sync."""
    no_sync = getattr(model, "no_sync", None)
    return contextlib.nullcontext() if last or no_sync is None else no_sync()


@dataclass
class StepLosses:
    """Per-task mean losses and token counts of one step."""

    losses: dict[int, float] = field(default_factory=dict)
    examples: dict[int, int] = field(default_factory=dict)
    tokens: int = 0


@dataclass
class Micro:
    """One task's examples in one micro-batch, collated, with their loss items."""

    task: int
    idx: np.ndarray
    batch: dict[str, torch.Tensor]
    items: int  # labelled tokens (token-level heads) or examples


def _generator(seed: int, step: int, task: int, micro: int, rank: int = 0) -> torch.Generator:
    # MLM masking draws from its own generator, a function of (seed, step, task, micro):
    # resume reproduces the masks and dropout's global RNG is left alone. Under torchrun
    # every rank collates its own slice of the micro-batch: ranks > 0 get streams of their
    # own, else all ranks would mask the same positions of their rows (rank 0 keeps the
    # one-process stream).
    base = ((seed * 1_000_003 + step) * 131 + task) * 17 + micro
    return torch.Generator().manual_seed(base if rank == 0 else (base * 7919 + rank) % 2**63)


def prepare(task: TaskRuntime, i: int, idx: np.ndarray, gen: torch.Generator) -> Micro:
    """Collate task `i`'s examples `idx` and count their loss items."""
    batch = task.batch.collate(task.train, idx, gen)
    return Micro(i, idx, batch, loss_items(task.cfg.head, batch["labels"]))


def loss_part(
    model: MultiTaskModel, precision: Precision, task: TaskRuntime, micro: Micro, total: int
) -> torch.Tensor:
    """This micro-batch's part of the task's mean loss over a step with `total` loss items
    (forward in the precision's context); the parts of a step add up to that mean."""
    with precision.forward_context():
        logits = model(task.name, **micro.batch)
    labels = micro.batch["labels"]
    if task.cfg.head in TOKEN_HEADS:
        return compute_loss(task.loss, logits, labels, task.cfg.head, num_items=total)
    loss = compute_loss(task.loss, logits, labels, task.cfg.head)
    if task.distill_loss is not None:  # `bitblend distill`: mix in the teacher's soft targets
        loss = task.distill_loss(logits, loss, micro.idx)
    # Pooled losses are per-example means: weigh by the micro-batch's share of the step
    # (exactly 1.0 for a step of one micro-batch, so that case is the plain mean).
    return loss * (micro.items / total)


def _fraction(items: int, total: int) -> float:
    return items / total if total else 0.0


def homogeneous(
    model: MultiTaskModel,
    precision: Precision,
    balancer: Balancer,
    tasks: list[TaskRuntime],
    task_idx: int,
    step: int,
    seed: int,
    grad_accum: int,
    count: Counter = _local,
) -> StepLosses:
    """One task, `grad_accum` equal micro-batches; gradients accumulate in the model.
    `count` sums the labelled tokens over the ranks (token-level heads)."""
    balancer.zero_grad()
    task = tasks[task_idx]
    indices = task.sampler.next()
    out = StepLosses(tokens=int(task.train.lengths[indices].sum()))
    micros = [
        prepare(task, task_idx, idx, _generator(seed, step, task_idx, m, task.sampler.rank))
        for m, idx in enumerate(np.split(indices, grad_accum))
    ]
    local = sum(m.items for m in micros)
    total, scale = local, 1.0
    world = task.sampler.world_size
    if task.cfg.head in TOKEN_HEADS and world > 1:
        # Ranks hold different numbers of labelled tokens: divide each rank's token sum by
        # the step's count over all ranks, times W since DDP/FSDP average the W gradients,
        # so the average is the one-process per-token mean. (Pooled heads: every rank has
        # the same number of examples, so its own mean is already exact.)
        total, scale = count([local])[0], float(world)
    parts = []
    for m, micro in enumerate(micros):
        with _accumulating(model, last=m == len(micros) - 1):
            part = loss_part(model, precision, task, micro, total) * scale
            fraction = {task_idx: _fraction(micro.items, local)}
            precision.backward(balancer.combine({task_idx: part}, {task_idx: 1.0}, fraction))
        parts.append(part.detach())
    # The step's mean (per token: token-level heads); under W ranks this rank's share x W,
    # so the example-weighted mean over the (equal) ranks is the step's mean.
    out.losses[task_idx] = float(sum(parts))
    out.examples[task_idx] = len(indices)
    return out


def mixed(
    model: MultiTaskModel,
    precision: Precision,
    balancer: Balancer,
    tasks: list[TaskRuntime],
    allocate: Any,
    step: int,
    seed: int,
    batch_size: int,
    grad_accum: int,
    aggregator: Any = None,
    count: Counter = _local,
) -> StepLosses:
    """Several tasks per micro-batch, as many examples of each as `allocate` says.
    `count` sums the labelled tokens over the ranks (token-level heads)."""
    balancer.zero_grad()
    out = StepLosses()
    plan: list[list[Micro]] = []
    empty: list[list[Micro]] = []
    items: dict[int, int] = {}
    counts: dict[int, int] = {}  # the step's examples of each task over all ranks

    def gen(i: int, m: int) -> torch.Generator:
        return _generator(seed, step, i, m, tasks[i].sampler.rank)

    for m in range(grad_accum):
        row, none = [], []
        for i, k in enumerate(allocate(step * grad_accum + m, batch_size)):
            if k <= 0:
                continue
            counts[i] = counts.get(i, 0) + int(k)
            # Under torchrun `k` is global and `take` returns this rank's part of it.
            idx = tasks[i].sampler.take(int(k))
            if len(idx) == 0:
                # This rank got none of the k: it still runs one example weighted 0, so
                # every rank's backward touches the same parameters (FSDP2, grad all-reduce).
                none.append(prepare(tasks[i], i, np.zeros(1, np.int64), gen(i, m)))
                continue
            row.append(prepare(tasks[i], i, idx, gen(i, m)))
            out.tokens += int(tasks[i].train.lengths[idx].sum())
            out.examples[i] = out.examples.get(i, 0) + len(idx)
            items[i] = items.get(i, 0) + row[-1].items
        plan.append(row)
        empty.append(none)
    # Each task's share of the step's examples (over all ranks: the same on every rank):
    # the `sum` path's weighting of its mean loss.
    n = sum(counts.values())
    shares = {i: k / n for i, k in counts.items()}
    # DDP/FSDP average gradients over W ranks: a rank's mean loss of task i is scaled by
    # n_i W / k_i (its n_i of the step's k_i examples), so the ranks' average is the mean
    # over all k_i examples, the one-process loss (per-token heads: see below). 1.0 in one
    # process.
    world = tasks[0].sampler.world_size
    scale = {i: e * world / counts[i] for i, e in out.examples.items()}
    # Token-level heads: the step's labelled tokens over all ranks divide each rank's token
    # sum, times W (the gradient average), so the ranks' average is the one-process
    # per-token mean. `counts` is global, so every rank sums the same list of tasks.
    totals = dict(items)
    token_tasks = sorted(i for i in counts if tasks[i].cfg.head in TOKEN_HEADS)
    if world > 1 and token_tasks:
        summed = count([items.get(i, 0) for i in token_tasks])
        for i, n_tok in zip(token_tasks, summed, strict=True):
            totals[i] = n_tok
            if i in scale:
                scale[i] = float(world)
    # What this rank reports per task: its loss sum's share of the step's mean x k_i / n_i
    # (1.0 in one process), so reduce_step's example-weighted mean is the step's mean.
    report = {i: counts[i] / (e * world) for i, e in out.examples.items()}
    # A task with no example on this rank in the whole step: its dummies carry the
    # uncertainty balancer's + s_i term (the one-process step counts it once).
    absent = {p.task for row in empty for p in row} - set(items)
    dummies = {i: sum(p.task == i for row in empty for p in row) for i in absent}
    sums: dict[int, list[torch.Tensor]] = {}
    for row, none in zip(plan, empty, strict=True):
        losses = {
            p.task: loss_part(model, precision, tasks[p.task], p, totals[p.task]) * scale[p.task]
            for p in row
        }
        fractions = {p.task: _fraction(p.items, items[p.task]) for p in row}
        for i, part in losses.items():
            sums.setdefault(i, []).append(part.detach() * report[i])
        zero: torch.Tensor | None = None
        for p in none:
            z = loss_part(model, precision, tasks[p.task], p, max(p.items, 1)) * 0.0
            if balancer.method == "uncertainty" and p.task in absent:
                losses[p.task], fractions[p.task] = z, 1.0 / dummies[p.task]
            else:  # outside the balancer (FAMO's log-loss would take the 0 as a loss)
                zero = z if zero is None else zero + z
        if aggregator is not None and len(losses) > 1:
            aggregate_backward(model, precision, losses, balancer, shares, aggregator)
        elif losses:
            combined = balancer.combine(losses, shares, fractions)
            precision.backward(combined if zero is None else combined + zero)
        elif zero is not None:
            precision.backward(zero)
    out.losses = {i: float(sum(parts)) for i, parts in sums.items()}
    return out


def trunk_parameters(model: MultiTaskModel) -> list[nn.Parameter]:
    """Parameters shared by every task: the backbone's."""
    return [p for p in model.backbone.parameters() if p.requires_grad]


def gradient_cosines(
    model: MultiTaskModel, precision: Precision, tasks: list[TaskRuntime]
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
