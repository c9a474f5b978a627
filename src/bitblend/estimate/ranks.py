"""One rank's bytes and traffic under data parallelism (DDP, FSDP2), from one process's
step (estimate/memory.py's `PeakBytes`): what each rank holds, gathers and sends."""

from __future__ import annotations

from dataclasses import dataclass

from bitblend.estimate.memory import FP32, PeakBytes, PrecisionSpec
from bitblend.estimate.shapes import ModelShape


@dataclass
class RankBytes:
    """One rank's memory and traffic under data parallelism: `train.batch_size` is the
    global batch, so each of the N ranks runs its slice of it (batch / N)."""

    strategy: str
    ranks: int
    peak: int
    peak_checkpointed: int
    note: str
    comm_bytes: int = 0  # bytes each rank sends per optimizer step (ring collectives)
    batch: int = 0  # examples of the worst task's micro-batch on this rank
    # weights, master copies and optimizer states this rank holds through the whole run
    # (FSDP2: its shard); the rest of `peak` is allocated and freed within each step
    resident: int = 0


def ring_factor(ranks: int) -> float:
    """(N-1)/N: the share of a buffer each rank sends in a ring all-gather or
    reduce-scatter (an all-reduce is both: twice that)."""
    return (ranks - 1) / ranks


def gather_bytes(spec: PrecisionSpec) -> int:
    """Width of FSDP2's all-gathered parameters: bf16 under bf16-mixed (its
    MixedPrecisionPolicy's param_dtype, precision/fsdp.py), the stored width otherwise."""
    bf16_policy = spec.autocast and spec.compute_dtype == "bfloat16" and spec.weight_bytes == FP32
    return spec.compute_bytes if bf16_policy else spec.weight_bytes


def comm_bytes(
    shape: ModelShape, spec: PrecisionSpec, grads: int, ranks: int, grad_accum: int = 1
) -> dict[str, int]:
    """Bytes each rank sends per optimizer step. DDP all-reduces the gradients after every
    micro-batch's backward: 2(N-1)/N x gradient bytes. FSDP2 all-gathers every unit's
    parameters in forward and again in backward (2 x (N-1)/N x parameter bytes at the
    gather width; fp32-kept units at 4) and reduce-scatters the gradients ((N-1)/N x
    gradient bytes, in fp32 under bf16-mixed)."""
    f = ring_factor(ranks)
    params = shape.fp32_params * FP32 + (shape.params - shape.fp32_params) * gather_bytes(spec)
    return {
        "ddp": round(2 * f * grads * grad_accum),
        "fsdp2": round((2 * f * params + f * grads) * grad_accum),
    }


def per_rank(
    shape: ModelShape,
    spec: PrecisionSpec,
    base: PeakBytes,
    ranks: int,
    grad_accum: int = 1,
    batch: int = 0,
) -> list[RankBytes]:
    """DDP and FSDP2 per-rank peaks for `ranks` processes; `base` is one rank's step (its
    slice of the global batch), `batch` that slice's size.

    DDP keeps a full replica on every rank; its flat all-reduce buckets hold the gradients
    themselves (bitblend wraps with gradient_as_bucket_view), so no second buffer. FSDP2
    shards weights, grads, masters and states N ways, all-gathers one block at a time (two
    with prefetch) at the gather width (bf16 under bf16-mixed, which then needs no autocast
    weight copies) and reduce-scatters each block's gradients from a full-size buffer.
    The root unit (embeddings, heads) stays gathered from forward to the end of backward,
    and its gradients are complete, and reduce-scattered, last: by then the activations
    are freed but every other gradient shard exists (the end of backward, a peak of its
    own when activations are small next to the embeddings: MiniLM's are 53% of it).
    """
    if ranks < 1:
        raise ValueError("ranks must be >= 1")
    st = base.static
    comm = comm_bytes(shape, spec, st.grads, ranks, grad_accum) if ranks > 1 else {}
    # DDP's buckets are allocated when the model is wrapped and the gradients are views
    # into them: every gradient's bytes exist from the start of backward, beside its
    # activations, and stay for the run.
    buckets = st.grads if ranks > 1 else 0
    temporary = base.temporary_total
    ddp_backward = base.resident + buckets + base.activations + temporary
    ddp_backward_ckpt = base.resident + buckets + base.activations_checkpointed + temporary
    ddp = RankBytes(
        "ddp",
        ranks,
        max(base.peak, ddp_backward),
        max(base.peak_checkpointed, ddp_backward_ckpt),
        "full replica, gradients in the all-reduce buckets",
        comm.get("ddp", 0),
        batch,
        base.resident + buckets,
    )
    if ranks == 1:
        fsdp = RankBytes(
            "fsdp2", 1, base.peak, base.peak_checkpointed, "one rank", 0, batch, base.resident
        )
        return [ddp, fsdp]
    # The root unit (embeddings, heads, final norm) is gathered like a block.
    root = max(shape.params - shape.layers * shape.layer_params, 0)
    width = gather_bytes(spec)
    gathered = max(2 * shape.layer_params, root) * width
    # a block's gradients at the gather width, cast to the reduce dtype (the gradients')
    reduce_buf = shape.layer_params * (width + spec.grad_bytes)
    if width == spec.compute_bytes:  # gathered bf16 weights: autocast casts nothing
        temporary -= base.temporary.get("autocast weight copies", 0)
    shard = base.resident / ranks
    step = (base.resident + st.grads + base.step_extra) / ranks
    # Sharded gradients accumulate during backward; at its start none exists.
    backward = shard + base.activations + temporary + gathered + reduce_buf
    backward_ckpt = shard + base.activations_checkpointed + temporary + gathered + reduce_buf
    # The end of backward: the root still gathered, its unsharded gradients and their
    # reduce-dtype copy, beside every other unit's gradient shard.
    end = shard + st.grads / ranks + root * (2 * width + spec.grad_bytes)
    fsdp = RankBytes(
        "fsdp2",
        ranks,
        round(max(backward, step, end)),
        round(max(backward_ckpt, step, end)),
        f"sharded {ranks} ways, <= 2 blocks gathered",
        comm["fsdp2"],
        batch,
        round(shard),
    )
    return [ddp, fsdp]
