"""High-water marks of a run outside its training step: the model's build and conversion,
evaluation, and saving. Arithmetic on sizes only, like memory.py.

A CPU process's peak RSS is a high-water mark: glibc keeps freed heap blocks, so what a
phase leaves in the heap stays resident below the phases after it. Measured per phase on
MiniLM / BBC News (benchmarks/estimate_vs_measured.py --phases, docs/estimate.md):

- build: a LoRA run builds its backbone in fp32 and converts the frozen base to
  `precision.base_bits` after the data is encoded, so the conversion's live bytes (the
  fp32 base and its stored copy, both alive while each layer is converted) land above the
  setup's high-water and stay there under the training steps (+125 MiB measured for a bf16
  base, +113-136 MiB for int8: the model says 130 and 109).
- evaluation: a no-grad forward of `train.eval_batch_size` examples (64 by default, four
  times a typical train batch) over the resident model state, plus the outputs of the
  whole eval split kept for scoring.
- saving: checkpoints and the final model/ read the frozen base's state_dict, which a
  low-bit base (8 or 4 bits) hands back dequantised to fp32: the whole base once more,
  which the heap the steps left does not absorb (measured: it lands on top of the run's
  high-water) (+59-104 MiB measured at save_model for an int8 base; the model says 87).
"""

from __future__ import annotations

from dataclasses import dataclass

from bitblend.estimate.memory import (
    FP32,
    INT64,
    PeakBytes,
    PrecisionSpec,
    attention_backend,
    causal_shift_bytes,
    score_elements,
)
from bitblend.estimate.ranks import RankBytes
from bitblend.estimate.shapes import ModelShape, TaskShape


@dataclass(frozen=True)
class HighWater:
    """Bytes a run holds beyond one training step's live tensors, by phase."""

    build: int  # left in the heap by the frozen base's conversion (CPU: below every step)
    eval: int  # live tensor bytes at an evaluation's peak: resident state + one batch
    save: int  # fresh bytes while checkpoints and model/ are written (dequantised base)
    # CPU, a LoRA run: bytes of `build` that every step's live tensors count too (the
    # stored frozen base), and how many layouts of its transient bytes the heap holds
    # (0: the allocator-slack model of `process`; see `layout_process`)
    kept: int = 0
    layouts: int = 0
    # the final checkpoint's copy of the optimizer state, on the rank that writes it
    # (`checkpoint_bytes`): it fills the heap's holes
    checkpoint: int = 0
    # live tensor bytes while a checkpoint is staged: resident state + the copies of the
    # optimizer states and masters it writes (checkpoint_live_bytes); host memory on a GPU.
    # The allocator-slack model of `process` counts it; the layout model uses the two above.
    checkpoint_live: int = 0
    # CPU, a whole run: what oneDNN keeps per matmul shape the run meets (estimate/
    # kernel_cache.py), and what the end of the run (its baselines and report) maps
    # outside the heap, on top of the high-water mark (estimate/wholerun.py)
    kernel_cache: int = 0
    end: int = 0
    # CPU on a tuned heap (train.cpu_heap): every evaluation starts by giving the heap's
    # free pages back (train/cpu_heap.py), so its peak is its live bytes, without the
    # steps' slack. pretrain-mix, whose evaluation decides: 1208 MiB over the runtime
    # measured, 896 of eval transient (cross_entropy's input and log_softmax: traced) +
    # 343 resident; x1.25 had read 1609 (docs/estimate.md, seventh round).
    eval_released: bool = False

    def process(self, step_tensors: int, runtime: int, slack: float, cpu: bool) -> int:
        """The run's peak. CPU (RSS): the worse of the step with allocator slack and the
        evaluation (with slack too unless its start released the heap's free pages), over
        the build's leftovers and the kernel caches, plus the save's fresh bytes and the
        end of the run's. GPU (live tensors; nothing stacks): the step, the conversion, or
        the resident state (within `eval`) with an evaluation's or a save's transient,
        whichever is largest."""
        if not cpu:
            return max(step_tensors, self.eval + self.save, self.build)
        live = max(step_tensors, self.checkpoint_live)
        evaluation = self.eval if self.eval_released else round(self.eval * (1 + slack))
        heap = self.build + self.kernel_cache + max(round(live * (1 + slack)), evaluation)
        return runtime + heap + self.save + self.end

    def layout_process(self, step_tensors: int, resident: int, runtime: int) -> int:
        """CPU, counted by layouts (`layouts` > 0): the resident state once (the part the
        build holds already, `kept`, not again), each step's transient bytes - the worse
        of the step's and an evaluation's peak above the resident state - `layouts`
        times, over the build, plus the save. The final checkpoint's copy of the
        optimizer state comes into a settled heap: it fills the holes the steps left and
        adds only what is larger than them."""
        return layout_bytes(self, step_tensors, resident, runtime, self.layouts)


def layout_bytes(hw: HighWater, step_tensors: int, resident: int, runtime: int, n: int) -> int:
    """`HighWater.layout_process` with `n` layouts of the transient bytes."""
    transient = max(max(step_tensors, hw.eval) - resident, 0)
    rest = max(resident - hw.kept, 0)
    steps = max(n * transient, hw.checkpoint)
    return runtime + hw.build + rest + steps + hw.save + hw.end


def build_bytes(shape: ModelShape, spec: PrecisionSpec) -> int:
    """The frozen base's conversion: its fp32 build plus the stored copy (0 without a
    LoRA base stored narrower than fp32)."""
    ad = shape.adapter
    if ad is None:
        return 0
    fp32 = ad.frozen_params * FP32
    stored = ad.frozen_bytes(spec.weight_bytes)
    return fp32 + stored if stored < fp32 else 0


def save_bytes(shape: ModelShape) -> int:
    """A low-bit frozen base (8 or 4 bits) dequantised to fp32 by its state_dict."""
    ad = shape.adapter
    if ad is None or ad.base_bits is None or ad.base_bits >= 16:
        return 0
    return ad.quantised_params * FP32


def checkpoint_live_bytes(step: PeakBytes) -> int:
    """Live bytes while a checkpoint is written (train/checkpoint.py): the resident state
    (weights, masters, optimizer states; no gradients between steps) plus a copy of every
    tensor of the trainer's state - `_flatten` clones each optimizer state and master
    weight (safetensors refuses shared storages) before `save_file` reads them; the model's
    own weights are written from the live tensors without a copy. Above the step when the
    states outweigh activations + gradients (small batches, large models)."""
    return step.resident + step.static.states + step.static.master


def eval_live_bytes(
    shape: ModelShape,
    task: TaskShape,
    spec: PrecisionSpec,
    eval_batch: int,
    device: str = "cpu",
) -> dict[str, int]:
    """Transient bytes of evaluating `task` (no grad, dropout off), beyond the resident
    model state: one batch's forward buffers and the split's kept outputs."""
    n = task.eval_examples or eval_batch
    b, s, h, i = min(eval_batch, n), task.seq, shape.hidden, shape.intermediate
    t, c = b * s, spec.compute_bytes
    backend = attention_backend(shape, device)
    # attention scores and probs (b, heads, s, s; one causal block's in bitblend's kernel):
    # fp32 in CPU math SDPA, the compute dtype in bitblend's kernel, none kept by flash
    a = FP32 if device == "cpu" and backend == "math" else c
    probs = b * shape.heads * score_elements(shape, s, backend)[1] * a if backend != "flash" else 0
    out = {
        # the biggest op's input and output (probs or the MLP's (t, i) activation), plus
        # the block's input, residual and output hidden states (t, h) in fp32
        "eval forward buffers": 2 * max(probs, t * i * c) + 3 * t * h * FP32,
    }
    if spec.autocast:
        # autocast's cast copies of the matmul weights live for the forward, as in a step
        out["eval autocast weight copies"] = shape.matmul_params * c
    if task.per_token:
        lm = task.head in ("masked_lm", "causal_lm")
        # logits (t, outputs) in their dtype, the loss's fp32 copy and log_softmax output
        out["eval logits"] = t * task.outputs * ((c if lm else FP32) + 2 * FP32)
        one = TaskShape(task.name, task.head, task.outputs, b, s)  # one eval batch
        out.update({f"eval {k}": v for k, v in causal_shift_bytes(one).items()})
        if not lm:  # token predictions and gold labels kept for the split: int64 each
            out["eval kept outputs"] = 2 * n * s * INT64
    else:
        # predict_outputs keeps (examples, outputs) fp32 scores of the whole split
        out["eval kept outputs"] = n * task.outputs * FP32
    return out


def high_water(
    shape: ModelShape,
    tasks: list[TaskShape],
    spec: PrecisionSpec,
    step: PeakBytes,
    eval_batch: int,
    device: str = "cpu",
) -> HighWater:
    """The run's phases beyond the step of `step` (the worst task's): the build, the worst
    task's evaluation over the resident state (weights, master, optimizer states: gradients
    are None between steps), and the save."""
    evals = [sum(eval_live_bytes(shape, t, spec, eval_batch, device).values()) for t in tasks]
    ad = shape.adapter
    return HighWater(
        build=build_bytes(shape, spec),
        eval=step.resident + max(evals, default=0),
        save=save_bytes(shape),
        kept=ad.frozen_bytes(spec.weight_bytes) if ad is not None else 0,
        layouts=TRANSIENT_LAYOUTS if ad is not None else 0,
        checkpoint=checkpoint_bytes(step),
        checkpoint_live=checkpoint_live_bytes(step),
    )


def checkpoint_bytes(step: PeakBytes) -> int:
    """The final checkpoint's copy of the optimizer state (train/checkpoint.py clones every
    state tensor before safetensors writes it). It comes from the heap like every block
    (train/cpu_heap.py maps no block on its own) and fills the holes the steps left."""
    return step.static.states


# -- layouts: how many times the heap holds a step's transient bytes (CPU) --------------
# Measured per step (glibc's mallinfo2 and /proc/self/smaps after each forward, backward
# and optimizer step; docs/estimate.md "Where the bytes are"): malloc's live bytes peak
# at what the tensor model counts, but the main heap grows more. What lives for the whole
# run (weights, optimizer states, DDP's gradient buckets, a LoRA run's stored base) is laid
# out once; what a step allocates and frees (activations, gradients that zero_grad drops,
# temporaries) rises 1.6-2.3x its live bytes in the heap (one MiniLM process, 8x64 and
# 16x128; LoRA over bf16 and int8 bases; ddp per rank): the backward's gradients and
# temporaries are allocated while the forward's activations still fill the heap, and the
# holes those leave as they are freed, in reverse order, do not fit the next step's
# forward, so the heap ends up holding two layouts of the step.
TRANSIENT_LAYOUTS = 2
# FSDP2 on gloo holds a third (measured 3.1-3.4x at 2 ranks, batch 16 and 32 x 64): every
# unit's parameters are gathered in forward, freed, and gathered again in backward in the
# opposite order next to new gradient shards and their reduce-dtype copies, and gloo's
# worker threads make flat copies of every collective's buffers in glibc arenas of their
# own, which the main thread cannot reuse. (With one arena, GLIBC_TUNABLES=
# glibc.malloc.arena_max=1, the same run stopped growing after its second step.)
FSDP2_LAYOUTS = 3


def rank_process(
    rank: RankBytes,
    base: PeakBytes,
    hw: HighWater,
    runtime: int,
    slack: float,
    cpu: bool,
) -> int:
    """One rank's process peak (the worst rank's). DDP runs a full replica: the single
    process's phases of its own slice of the batch, its resident state (gradient
    buckets included) once and its transient bytes TRANSIENT_LAYOUTS times. FSDP2 holds
    its resident shard once and the step's transient bytes FSDP2_LAYOUTS times, over
    the whole unsharded model that every rank builds before sharding (heap the steps
    reuse: the larger of the two), and rank 0 ends the run with an unsharded replica for
    model/, loaded from the gathered state dict (measured: it lands above the steps'
    high-water, like a save)."""
    if rank.ranks == 1:  # one process: as `bitblend estimate` without --ranks
        if cpu and hw.layouts:
            return hw.layout_process(rank.peak, rank.resident, runtime)
        return hw.process(rank.peak, runtime, slack, cpu)
    if rank.strategy != "fsdp2":
        if not cpu:
            return hw.process(rank.peak, runtime, slack, cpu)
        return layout_bytes(hw, rank.peak, rank.resident, runtime, TRANSIENT_LAYOUTS)
    full = base.static.weights  # the unsharded model at rest: the build, the replica
    if not cpu:  # CUDA's caching allocator: live tensors, nothing stacks
        return max(rank.peak, hw.build, full)
    evaluation = max(hw.eval - base.resident, 0)  # an eval batch over the shard
    transient = max(rank.peak - rank.resident, evaluation)
    step = rank.resident + FSDP2_LAYOUTS * transient
    return runtime + hw.build + max(step, full) + hw.save + full
