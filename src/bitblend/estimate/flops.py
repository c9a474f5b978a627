"""FLOPs of a training step (matmuls and attention, forward and backward) and its time on
a device with measured peaks.

A matmul of (m, k) by (k, n) is 2*m*n*k FLOPs. Backward costs twice the forward (the
gradient of the input and of the weight). Embedding lookups, norms, activations, dropout
and the optimizer are counted as memory traffic, random draws and per-op overhead in the
time model, never as FLOPs, the way MFU is usually reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bitblend.estimate.memory import (
    FP32,
    ActivationBytes,
    PrecisionSpec,
    fused_qkv,
    score_elements,
)
from bitblend.estimate.probe import Peaks
from bitblend.estimate.shapes import ModelShape, TaskShape

# Elementwise ops (casts, dropout, softmax, norms, GELU, residual adds, their backward and
# SDPA's math-path masking) move about 15 bytes per saved activation byte at the probed
# bandwidth: fitted on 16 single-thread profiled steps (MiniLM and the tiny models, 3
# precisions, batch 8-32, seq 64-128; docs/estimate.md), within 20% on each.
TRAFFIC_PER_SAVED_BYTE = 15.0
# bitblend's CPU attention and dropout (model.kernels=auto) save less - bool masks, 16-bit
# probabilities - for about the same elementwise passes: 26 bytes per saved byte, fitted on
# benchmarks/estimate_vs_measured.py's 10 cases (in sample; docs/estimate.md; 29 before the
# masks were applied by a vectorised multiply instead of `where`).
TRAFFIC_PER_SAVED_BYTE_FAST = 26.0
# aten ops per transformer block (forward + backward), counted with the profiler: 32-true
# 194 computing ops + 488 views and dispatch-only ops, with autocast or bf16 weights 284 +
# 584 (the casts); outside the blocks (embeddings, head, loss, clipping, optimizer) 183 +
# 274. A view costs about a fifth of a computing op, which costs the probed dispatch time
# of a small autograd op: what a tiny model's step is made of.
OPS_PER_LAYER = {4: 194 + 488 / 5, 2: 284 + 584 / 5}
OPS_FIXED = 183 + 274 / 5
# bitblend's CPU attention and dropout add computing ops and views per block (profiled on
# tiny-bert, top-level aten ops: masks, the additive bias, scalings): 32-true 19 + 15,
# bf16 19 + 11.
OPS_FAST_EXTRA = {4: 19 + 15 / 5, 2: 19 + 11 / 5}
# One q/k/v matmul per block (models/fused_qkv.py) removes top-level ops per block
# (counted the same way on tiny-bert, forward + backward): 32-true 7 + 7 views, under
# autocast 7 + 13 (two of the three input casts go too).
OPS_FUSED_QKV = {4: -(7 + 7 / 5), 2: -(7 + 13 / 5)}


def linear_flops(m: int, n: int, k: int) -> int:
    """FLOPs of an (m, k) @ (k, n) matmul: one multiply and one add per term."""
    return 2 * m * n * k


def forward_flops(shape: ModelShape, task: TaskShape) -> dict[str, int]:
    """Forward FLOPs of one micro-batch, by part (matmuls only)."""
    b, s, t = task.batch, task.seq, task.tokens
    h, i, L = shape.hidden, shape.intermediate, shape.layers
    out = {
        "qkv + output projections": L * 4 * linear_flops(t, h, h),
        "mlp": L * (linear_flops(t, i, h) + linear_flops(t, h, i)),
        # q @ k^T and probs @ v over the full (s, s) square: SDPA's math and flash kernels
        # both compute it whole (a causal mask only zeroes half of it).
        "attention": L * 2 * b * linear_flops(s, s, h),
    }
    ad = shape.adapter
    if ad is not None:
        # each wrapped layer's A (in -> r) and B (r -> out ~ in) on every token
        out["lora"] = L * 2 * linear_flops(t, ad.r, ad.lora_in_per_layer)
    rows = t if task.per_token else b
    out["head"] = linear_flops(rows, task.outputs, h)
    return out


@dataclass
class StepFlops:
    """FLOPs of one optimizer step (all micro-batches of the gradient accumulation)."""

    forward: int
    backward: int
    recompute: int  # the extra forward that activation checkpointing runs in backward
    parts: dict[str, int] = field(default_factory=dict)  # forward FLOPs by part

    @property
    def total(self) -> int:
        """Forward + backward."""
        return self.forward + self.backward

    @property
    def total_checkpointed(self) -> int:
        """Forward + backward + recomputed forward."""
        return self.total + self.recompute


def step_flops(shape: ModelShape, task: TaskShape, grad_accum: int = 1) -> StepFlops:
    """Forward + backward FLOPs of one optimizer step of `task`."""
    parts = forward_flops(shape, task)
    fwd = sum(parts.values()) * grad_accum
    # Recomputation reruns the blocks' forward, not the head's.
    blocks = (fwd - parts["head"] * grad_accum) if shape.layers else 0
    backward = 2 * fwd
    if shape.adapter is not None:
        # A frozen projection's backward computes the input gradient only, no weight one.
        frozen = parts["qkv + output projections"] + parts["mlp"]
        if task.name in shape.adapter.frozen_heads:  # a frozen LM head: input gradient only
            frozen += parts["head"]
        backward -= frozen * grad_accum
    return StepFlops(forward=fwd, backward=backward, recompute=blocks, parts=parts)


def tokens_flops(shape: ModelShape, tokens: int, examples: int, lm_tokens: int = 0) -> int:
    """Forward + backward FLOPs of `tokens` real tokens in `examples` examples (no padding):
    what a finished run actually computed usefully, for achieved FLOP/s and MFU."""
    if examples <= 0 or tokens <= 0:
        return 0
    h, i, L = shape.hidden, shape.intermediate, shape.layers
    per_token = L * (4 * 2 * h * h + 2 * 2 * h * i)
    mean = tokens / examples
    # Attention is quadratic in each example's length; the mean length stands in for all.
    attention = L * 2 * 2 * mean * mean * h * examples
    head = 2 * h * shape.vocab * lm_tokens
    return int(3 * (per_token * tokens + attention + head))


@dataclass
class StepTime:
    """Estimated seconds of one optimizer step, by cause."""

    parts: dict[str, float]

    @property
    def total(self) -> float:
        """All causes together (they run one after another on a CPU)."""
        return sum(self.parts.values())


def eval_time(
    shape: ModelShape,
    task: TaskShape,
    spec: PrecisionSpec,
    acts: ActivationBytes,
    peaks: Peaks,
    eval_batch: int,
    device: str = "cpu",
) -> float:
    """Seconds of one evaluation of `task`: a forward pass (no dropout, no backward, no
    optimizer) over its eval examples in batches of `eval_batch`, costed like a step's
    forward third. `acts` are the activations of one such eval batch (they are not kept,
    but the elementwise passes move them once)."""
    if not task.eval_examples:
        return 0.0
    batches = math.ceil(task.eval_examples / eval_batch)
    one = TaskShape(task.name, task.head, task.outputs, eval_batch, task.seq)
    parts = forward_flops(shape, one)
    linear = sum(parts.values()) - parts["attention"]
    attention = parts["attention"] * computed_scores(shape, task.seq, acts.attention)
    attn_dtype = "float32" if acts.attention == "math" and device == "cpu" else spec.compute_dtype
    fast = acts.attention == "bitblend"
    traffic = TRAFFIC_PER_SAVED_BYTE_FAST if fast else TRAFFIC_PER_SAVED_BYTE
    width = min(spec.compute_bytes, spec.weight_bytes)
    per_layer = OPS_PER_LAYER[width] + (OPS_FAST_EXTRA[width] if fast else 0.0)
    seconds = (
        linear / peaks.flops(spec.compute_dtype)
        + attention / peaks.attention(attn_dtype)
        + traffic * acts.total / 3 / peaks.bandwidth
        + shape.layers * per_layer / 3 * peaks.op_overhead
    )
    return batches * seconds


def computed_scores(shape: ModelShape, seq: int, backend: str) -> float:
    """The share of the (s x s) attention FLOPs that run: bitblend's causal blocks skip the
    scores above the diagonal's blocks (`score_elements`)."""
    return score_elements(shape, seq, backend)[0] / seq**2 if seq else 1.0


def step_time(
    shape: ModelShape,
    task: TaskShape,
    spec: PrecisionSpec,
    acts: ActivationBytes,
    peaks: Peaks,
    *,
    grad_accum: int = 1,
    states: int = 2,
    checkpointing: bool = False,
    device: str = "cpu",
) -> StepTime:
    """Seconds per optimizer step: matmuls at the probed peak of their dtype, elementwise
    traffic at the probed bandwidth, dropout draws at the probed RNG rate, and a per-op
    overhead that dominates tiny models."""
    parts = forward_flops(shape, task)
    linear = sum(parts.values()) - parts["attention"]
    attention = parts["attention"] * computed_scores(shape, task.seq, acts.attention)
    passes = 4 if checkpointing else 3  # forward, backward (2x), recomputed forward
    recompute = 4 / 3 if checkpointing else 1.0
    # CPU math SDPA upcasts to fp32, so its bmms run at fp32 speed.
    attn_dtype = "float32" if acts.attention == "math" and device == "cpu" else spec.compute_dtype
    matmul = passes * linear / peaks.flops(spec.compute_dtype)
    attn = passes * attention / peaks.attention(attn_dtype)
    fast = acts.attention == "bitblend"
    traffic = TRAFFIC_PER_SAVED_BYTE_FAST if fast else TRAFFIC_PER_SAVED_BYTE
    elementwise = traffic * acts.total * recompute / peaks.bandwidth
    draws = 0.0
    if shape.hidden_dropout > 0:
        # two dropouts per block and one after the embeddings, over (T, h)
        draws += (2 * shape.layers + 1) * task.tokens * shape.hidden
    if shape.attn_dropout > 0:
        draws += shape.layers * task.batch * shape.heads * task.seq**2
    rate = peaks.fast_rng if fast and peaks.fast_rng else peaks.rng
    rng = draws * recompute / rate if rate else 0.0
    width = min(spec.compute_bytes, spec.weight_bytes)
    per_layer = OPS_PER_LAYER[width] + (OPS_FAST_EXTRA[width] if fast else 0.0)
    if fused_qkv(shape, spec):
        per_layer += OPS_FUSED_QKV[width]
    ops = shape.layers * per_layer * recompute
    overhead = (ops + OPS_FIXED) * peaks.op_overhead  # each at the probed cost of a bare op
    # Fused AdamW reads param, grad and states and writes param and states; clipping reads
    # the grads once more. A master copy adds the bf16->fp32 grad copy and the copy back.
    optimized = FP32 if spec.master else spec.weight_bytes
    per_param: float = 2 * optimized + 2 * spec.grad_bytes + 2 * states * spec.state_bits / 8
    if spec.master:
        per_param += spec.grad_bytes + FP32 + FP32 + spec.weight_bytes
    # An idle table (the backbone's token embedding under an own-vocabulary task) gets no
    # gradient, so fused AdamW and clipping skip it (no state either: shapes.py).
    optimizer = (shape.params - shape.idle_params) * per_param / peaks.bandwidth
    micro = {
        "matmul": matmul,
        "attention": attn,
        "elementwise": elementwise,
        "dropout rng": rng,
        "op overhead": overhead,
    }
    out = {k: v * grad_accum for k, v in micro.items()}
    out["optimizer"] = optimizer
    return StepTime(out)
