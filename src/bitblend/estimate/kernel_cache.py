"""What a CPU run's bf16 matmuls keep for every new shape: oneDNN's kernel caches.

On CPU, PyTorch runs bf16 matmuls (autocast's and bf16 weights') through oneDNN, which
builds a primitive (JIT-compiled code and its buffers) for each new (rows, in, out) shape
and keeps it in two caches: ideep's (`LRU_CACHE_CAPACITY`) and oneDNN's own
(`ONEDNN_PRIMITIVE_CACHE_CAPACITY`), 1,024 entries each by default. A Linear layer's
forward, its input gradient and its weight gradient are three shapes, and the rows are
batch x padded length, so a run whose batches are padded to their own longest row builds
a new set at every length it has not seen yet: ~0.5 MiB a primitive here (torch 2.13),
whatever the layer's size, ~9 MiB per new length for MiniLM's four Linear shapes.
fp32 matmuls (MKL) keep nothing per shape.

Measured on the users' own-vocabulary reviews (#22; docs/estimate.md, seventh round):
glibc's live bytes rose 9 MiB at each new length and stayed (370 MiB after 12 steps, 291
with the caches off: `LRU_CACHE_CAPACITY=1 ONEDNN_PRIMITIVE_CACHE_CAPACITY=0`; ideep's at 0
crashes torch). Peak RSS was 60-80 MiB above the same run with every batch padded to 128
(one shape), and equal to it (1162-1171 MiB) with the caches off:
what earlier rounds read as a heap layout the shorter steps leave below the longest one is
these caches. So the estimate counts them: the distinct row counts a run is expected to
meet (its tasks' priced length distributions over its steps, and its evaluations' batches)
x the model's Linear shapes x primitives per shape x the bytes of one primitive, which the
estimate measures here (a few tiny bf16 matmuls at fresh shapes, 0.1-0.3 s once per process).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bitblend.estimate.lengths import PricedLengths
from bitblend.estimate.memory import PrecisionSpec, attention_backend, fused_qkv
from bitblend.estimate.shapes import ModelShape, TaskShape
from bitblend.models.attention import query_blocks

DEFAULT_CAPACITY = 1024  # entries of each cache (ideep's and oneDNN's) unless set
PROBE_IN, PROBE_OUT = 24, 40  # a Linear shape no model here has, so its primitives are new
PROBE_HEADS, PROBE_DIM = 3, 8  # likewise for the attention's batched matmuls
PROBE_ROWS = 5  # fresh row counts per probe (medians of their growth)


@dataclass(frozen=True)
class PrimitiveBytes:
    """Bytes oneDNN keeps per new row count: for one Linear shape and for one pair of
    attention matmuls (q @ k^T, probs @ v), run forward alone (an evaluation) and forward
    with both gradients (a training step)."""

    linear_fwd: float = 0.0
    linear_train: float = 0.0
    attention_fwd: float = 0.0
    attention_train: float = 0.0


_measured: PrimitiveBytes | None = None  # once per process
_next_rows = 1000  # row counts the probe has not used in this process yet


def _grown(run: Callable[[int, bool], None], grads: bool) -> float:
    """Median growth of glibc's live bytes over PROBE_ROWS fresh row counts of `run`: what
    stays once it has returned (its tensors, inputs included, are gone by then)."""
    global _next_rows
    import statistics

    from bitblend.procmem import malloc_live_bytes

    out = []
    for _ in range(PROBE_ROWS):
        rows, _next_rows = _next_rows, _next_rows + 1
        before = malloc_live_bytes() or 0
        with torch.set_grad_enabled(grads), torch.autocast("cpu", dtype=torch.bfloat16):
            run(rows, grads)
        out.append((malloc_live_bytes() or 0) - before)
    # the median: a stray allocation of another thread moves one reading, not the result
    return max(0.0, statistics.median(out))


def primitive_bytes() -> PrimitiveBytes:
    """What oneDNN keeps per new shape, measured in this process as glibc's live bytes
    grew (all 0 where that cannot be read: no glibc)."""
    global _measured
    if _measured is not None:
        return _measured
    from bitblend.procmem import malloc_live_bytes

    if malloc_live_bytes() is None:
        _measured = PrimitiveBytes()
        return _measured
    lin = torch.nn.Linear(PROBE_IN, PROBE_OUT)

    def linear(rows: int, grads: bool) -> None:
        x = torch.randn(rows, PROBE_IN, requires_grad=grads)
        y = lin(x)
        if grads:
            y.float().sum().backward()
        lin.zero_grad(set_to_none=True)  # x, y and x.grad go when this returns

    def attention(rows: int, grads: bool) -> None:
        q = torch.randn(PROBE_HEADS, rows, PROBE_DIM, requires_grad=grads)
        k = torch.randn(PROBE_HEADS, rows, PROBE_DIM, requires_grad=grads)
        out = torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), k)
        if grads:
            out.float().sum().backward()

    _measured = PrimitiveBytes(
        _grown(linear, False), _grown(linear, True),
        _grown(attention, False), _grown(attention, True),
    )  # fmt: skip
    return _measured


def linear_shapes(shape: ModelShape, tasks: list[TaskShape], fused: bool) -> int:
    """Distinct (in, out) shapes of the Linear layers a step runs in bf16: the blocks'
    projections (q/k/v as one matmul where bitblend fuses them), and each vocabulary an LM
    head predicts (pooled heads run in fp32)."""
    h, i = shape.hidden, shape.intermediate
    kv = h // max(1, shape.heads) * (shape.kv_heads or shape.heads)
    shapes = {(h, h), (h, i), (i, h)}  # the attention's output (and q), the MLP
    if shape.family == "gpt2" or fused:
        shapes.add((h, h + 2 * kv))  # c_attn, or bitblend's fused q/k/v
    else:
        shapes.add((h, kv))  # k and v (the same as q's without grouped heads)
    for t in tasks:
        if t.head in ("masked_lm", "causal_lm"):
            shapes.add((h, t.outputs))
    return len(shapes)


def expected_rows(tasks: list[TaskShape], priced: list[PricedLengths], steps: list[float]) -> float:
    """Distinct training row counts (micro-batch x positions) a run is expected to meet:
    each is there unless every one of its tasks' `steps` micro-batches missed it."""
    miss: dict[int, float] = {}
    for task, p, n in zip(tasks, priced, steps, strict=True):
        for length, prob in p.train.items():
            rows = task.batch * length
            miss[rows] = miss.get(rows, 1.0) * (1.0 - min(1.0, prob)) ** n
    return sum(1.0 - m for m in miss.values())


def eval_rows(priced: list[PricedLengths]) -> int:
    """Distinct row counts of the evaluations' batches (the same at every evaluation)."""
    return len({b * length for p in priced for (b, length) in p.eval})


def capacity() -> int:
    """Entries the smaller of the two caches keeps (their environment settings)."""
    sizes = []
    for var in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        try:
            sizes.append(int(os.environ.get(var, DEFAULT_CAPACITY)))
        except ValueError:
            sizes.append(DEFAULT_CAPACITY)
    return max(0, min(sizes))


@dataclass(frozen=True)
class RowCost:
    """What one new row count costs the caches: bytes and primitives, in a training
    micro-batch (forward and gradients) and in an evaluation batch (forward)."""

    train: float
    evaluation: float
    train_primitives: int
    eval_primitives: int


def row_cost(
    shape: ModelShape, tasks: list[TaskShape], spec: PrecisionSpec, device: str
) -> RowCost:
    """Per distinct row count: every Linear shape's forward and gradients (a frozen base's
    layers have no weight gradient, their LoRA A and B do), and bitblend's attention's
    batched matmuls (one pair per block of queries of a causal model). Nothing on a GPU,
    or for fp32 and fp16 matmuls (MKL and the reference kernels keep nothing)."""
    if device != "cpu" or spec.compute_dtype != "bfloat16":
        return RowCost(0.0, 0.0, 0, 0)
    c = primitive_bytes()
    n = linear_shapes(shape, tasks, fused_qkv(shape, spec))
    own = attention_backend(shape, device) == "bitblend"
    seq = max((t.seq for t in tasks), default=0)
    blocks = len(query_blocks(seq)) if own and shape.causal else int(own)
    if shape.adapter is None:
        linear, prims = n * c.linear_train, 3 * n
    else:
        # a frozen layer: its forward and input gradient (the gradients' two primitives
        # cost alike); its adapter's A and B: two more shapes that train in full
        linear = n * ((c.linear_fwd + c.linear_train) / 2 + 2 * c.linear_train)
        prims = 2 * n + 6 * n
    return RowCost(
        train=linear + blocks * c.attention_train,
        evaluation=n * c.linear_fwd + blocks * c.attention_fwd,
        train_primitives=prims + 6 * blocks,
        eval_primitives=n + 2 * blocks,
    )


def kernel_cache_bytes(
    shape: ModelShape,
    tasks: list[TaskShape],
    priced: list[PricedLengths],
    steps: list[float],
    evals: int,
    spec: PrecisionSpec,
    device: str,
) -> int:
    """CPU, bf16 matmuls: what the caches hold at the end of the run - `row_cost` for
    each distinct row count the run is expected to meet (its tasks' `steps` micro-batches,
    and its evaluations' batches when it evaluates), at most the caches' capacity."""
    cost = row_cost(shape, tasks, spec, device)
    if cost.train <= 0:
        return 0
    rows_train = expected_rows(tasks, priced, steps)
    rows_eval = eval_rows(priced) if evals else 0
    total = rows_train * cost.train + rows_eval * cost.evaluation
    prims = rows_train * cost.train_primitives + rows_eval * cost.eval_primitives
    cap = capacity()
    if prims > cap:  # both caches evict their oldest entries past this
        total *= cap / prims
    return round(total)
