"""`bitblend estimate`: what a recipe will cost before it runs - parameters, bytes, FLOPs and
time per step - under each precision recipe, on this machine and per rank.

One module per concern: shapes.py (the model's sizes, from its config), memory.py
(bytes), flops.py (FLOPs and time), lengths.py (the sequence lengths steps really run at),
probe.py (this machine's measured peaks), report.py (tables and JSON). This file puts them
together for a recipe.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bitblend.config.schema import Recipe
from bitblend.device import pick_device
from bitblend.errors import BitblendError
from bitblend.estimate.draws import steps_per_task
from bitblend.estimate.flops import StepFlops, StepTime, step_flops, tokens_flops
from bitblend.estimate.highwater import HighWater, high_water, rank_process
from bitblend.estimate.kernel_cache import kernel_cache_bytes
from bitblend.estimate.lengths import (
    PricedLengths,
    TaskLengths,
    priced_eval_time,
    priced_lengths,
    priced_step_time,
)
from bitblend.estimate.memory import (
    CPU_ALLOCATOR_SLACK,
    RECIPES,
    PeakBytes,
    PrecisionSpec,
    bytes_per_param,
    optimizer_states,
    peak_bytes,
    precision_spec,
    what_if_specs,
)
from bitblend.estimate.probe import Peaks, confirm_peak, get_peaks, speed_again
from bitblend.estimate.ranks import RankBytes, per_rank
from bitblend.estimate.shapes import (
    ModelShape,
    TaskShape,
    backbone_config,
    recipe_shapes,
    shape_from_config,
)
from bitblend.precision.state_bits import resolve_state_bits


# -- the estimate ------------------------------------------------------------------------
@dataclass
class Row:
    """One precision recipe's costs for the recipe's worst-case task."""

    spec: PrecisionSpec
    selected: bool  # the recipe's own precision (auto resolved)
    memory: PeakBytes
    flops: StepFlops
    time: StepTime
    # per step, averaged over tasks by how many of the run's steps each trains (its
    # mixture replayed, estimate/draws.py; the target shares for a long run)
    mean_time: float

    ranks: list[RankBytes]
    warnings: list[str] = field(default_factory=list)
    eval_time: float = 0.0  # one evaluation of every task (forward passes only)
    evals: int = 0  # evaluations of a run: every train.eval_every steps, and at the end
    steps: int = 0  # train.steps (train.epochs resolved from the data sizes)
    # the run's phases beyond the step: build/conversion, evaluation, saving (highwater.py)
    high_water: HighWater = field(default_factory=lambda: HighWater(0, 0, 0))
    # CPU: the page faults of growing from the runtime to the peak (from the recycled pool
    # as probed now) and of the evaluations' releases; and the same with no pool
    warmup: float = 0.0
    warmup_cold: float = 0.0

    @property
    def run_time(self) -> float:
        """Train steps plus evaluations (plus the first steps' warm-up): what the run's
        wall clock will mostly show."""
        return self.steps * self.mean_time + self.evals * self.eval_time + self.warmup


@dataclass
class Estimate:
    """Everything `bitblend estimate` reports."""

    recipe: Recipe
    shape: ModelShape
    tasks: list[TaskShape]
    shares: list[float]
    worst: int  # index of the task with the largest step
    device: str
    peaks: Peaks
    states: int
    rows: list[Row]
    runtime_bytes: int  # CPU: resident bytes of the process before any model tensor
    available_bytes: int  # memory this machine can give the run
    ranks: int
    notes: list[str] = field(default_factory=list)
    # per task: the lengths its steps and evaluations are priced at (estimate/lengths.py)
    priced: list[PricedLengths] = field(default_factory=list)

    def total_bytes(self, row: Row, checkpointed: bool = False) -> int:
        """What the process will hold at its peak: runtime + the worse of the step's and an
        evaluation's tensors (+ CPU allocator slack), over what the build left, plus the
        save's fresh bytes (estimate/highwater.py)."""
        tensors = row.memory.peak_checkpointed if checkpointed else row.memory.peak
        cpu = self.device == "cpu"
        if cpu and row.high_water.layouts:  # LoRA: counted by layouts (highwater.py)
            return row.high_water.layout_process(tensors, row.memory.resident, self.runtime_bytes)
        return row.high_water.process(tensors, self.runtime_bytes, CPU_ALLOCATOR_SLACK, cpu)

    def rank_bytes(self, row: Row, rank: RankBytes) -> int:
        """What one rank's process will hold at its peak (estimate/highwater.py)."""
        cpu = self.device == "cpu"
        return rank_process(
            rank, row.memory, row.high_water, self.runtime_bytes, CPU_ALLOCATOR_SLACK, cpu
        )

    def process_bytes(self, tensors: int) -> int:
        """A process holding `tensors` live bytes at its peak (one rank's, under --ranks)."""
        if self.device != "cpu":
            return tensors  # CUDA allocator peak: tensors only
        return self.runtime_bytes + round(tensors * (1 + CPU_ALLOCATOR_SLACK))


def resolve_precision(recipe: Recipe, device: torch.device) -> str:
    """The concrete recipe `precision.recipe` stands for on `device` (`auto` resolved)."""
    from bitblend.precision.recipes import auto_recipe

    name: str = recipe.precision.recipe
    return auto_recipe(device) if name == "auto" else name


def process_resident_bytes() -> int:
    """Resident set size of this process now (Linux), 0 where unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def available_memory(device: torch.device) -> int:
    """Bytes a run may use: GPU memory, or MemAvailable + this process's own RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    from bitblend.procmem import mem_available_bytes

    available = mem_available_bytes()
    return 0 if available is None else available + process_resident_bytes()


def precision_specs(recipe: Recipe, choice: str, device: torch.device) -> list[PrecisionSpec]:
    """Specs to report: every recipe and the what-if rows (`all`), the recipe's own
    (`recipe`), or one named recipe."""
    own = resolve_precision(recipe, device)
    pc = recipe.precision
    if choice == "all":
        return [precision_spec(n) for n in RECIPES[:4]] + what_if_specs()
    if choice in ("recipe", "auto"):
        # The recipe's own row, with its master / rounding / state-width settings.
        spec = precision_spec(
            own,
            master_weights=pc.master_weights,
            state_bits=resolve_state_bits(pc.state_bits, device.type),
            rounding=pc.rounding,
        )
        return [spec]
    if choice not in RECIPES:
        raise BitblendError(
            f"--precision {choice}: expected all, recipe, auto or one of {', '.join(RECIPES)}"
        )
    return [precision_spec(choice)]


def _same(a: PrecisionSpec, b: PrecisionSpec) -> bool:
    """Whether row `a` is the configuration `b` (variant rows carry a +suffix name)."""
    fields = ("weight_bytes", "grad_bytes", "master", "state_bits", "compute_bytes", "comp_bytes")
    base = a.name.split("+")[0] == b.name.split("+")[0]
    return base and all(getattr(a, f) == getattr(b, f) for f in fields)


def estimate_recipe(
    recipe: Recipe,
    *,
    precision: str = "all",
    ranks: int = 1,
    device: torch.device | None = None,
    peaks: Peaks | None = None,
    runtime: str = "self",
    lengths: list[TaskLengths | None] | None = None,
) -> Estimate:
    """Estimate memory, FLOPs and time per step of `recipe` under each precision.

    `runtime` is how the CPU process figure gets its resident runtime: "measure" runs a
    child that imports, loads and tokenises as `train` does (estimate/runtime.py; what the
    CLI does), "self" takes this process's RSS (quick, low: fewer imports, no encodings).
    Time is priced at each task's token lengths (estimate/lengths.py): the child's, or with
    "self" (and on GPUs) encoded in this process; `lengths` gives them instead (None for a
    task: the worst case, every example max_length)."""
    from bitblend.taskspec import load_data

    if ranks < 1:
        raise BitblendError(f"--ranks {ranks}: expected an integer >= 1")
    dev = device or pick_device(recipe.train.device)
    datas = load_data(recipe)
    shape, tasks, shares = recipe_shapes(recipe, datas)
    states = optimizer_states(recipe.optimizer.name, recipe.optimizer.momentum)
    fused = recipe.optimizer.name in ("adam", "adamw")
    checked = peaks is None and dev.type == "cpu"  # get_peaks checks the speed now
    peaks = peaks or get_peaks(dev, now=True)
    own = resolve_precision(recipe, dev)
    pc = recipe.precision
    own_spec = precision_spec(
        own,
        master_weights=pc.master_weights,
        state_bits=resolve_state_bits(pc.state_bits, dev.type),
        rounding=pc.rounding,
    )
    accum = recipe.train.grad_accum
    steps, evals = run_length(recipe, tasks)
    runtime_bytes, measured, end = _runtime(recipe, dev, runtime, ranks, datas, lengths)
    if checked and peaks.source == "cached":
        # a second speed reading, seconds after the first: the better one prices the run
        peaks = speed_again(dev, peaks)
    # train's Mixture counts the encoded rows (a packed task's rows, not its documents)
    known = [measured[i] if i < len(measured) else None for i in range(len(tasks))]
    sizes = [
        len(m.order) if m and m.order else t.train_examples
        for m, t in zip(known, tasks, strict=True)
    ]
    counts = steps_per_task(recipe, sizes, steps)
    drawn = [c / steps for c in counts] if counts else shares  # each task's share of steps
    priced = _priced(recipe, tasks, shares, measured, counts)
    micro = [steps * share * accum for share in drawn]  # each task's micro-batches
    timing = peaks.at_speed()  # times at the rates the machine gives now (probe.speed_now)
    rows: list[Row] = []
    worst = 0
    for spec in precision_specs(recipe, precision, dev):
        per_task = [peak_bytes(shape, t, spec, states, dev.type, fused) for t in tasks]
        worst = max(range(len(tasks)), key=lambda k: (per_task[k].peak, tasks[k].tokens))
        task = tasks[worst]
        times = [
            priced_step_time(
                shape, t, p, spec, timing, grad_accum=accum, states=states, device=dev.type
            )
            for t, p in zip(tasks, priced, strict=True)
        ]
        row = Row(
            spec=spec,
            selected=_same(spec, own_spec),
            memory=per_task[worst],
            flops=step_flops(shape, task, accum),
            time=times[worst],
            mean_time=sum(s * t.total for s, t in zip(drawn, times, strict=True)),
            ranks=_per_rank(shape, task, spec, states, dev.type, fused, ranks, accum),
            eval_time=sum(
                priced_eval_time(shape, t, p, spec, timing, dev.type)
                for t, p in zip(tasks, priced, strict=True)
            ),
            evals=evals,
            steps=steps,
            high_water=replace(
                high_water(
                    shape, tasks, spec, per_task[worst], recipe.train.eval_batch_size, dev.type
                ),
                kernel_cache=kernel_cache_bytes(shape, tasks, priced, micro, evals, spec, dev.type),
                eval_released=dev.type == "cpu" and heap_released(recipe),
                end=end,
            ),
        )
        if spec.name == "16-mixed" and dev.type == "cpu":
            row.warnings.append("fp16 matmuls on CPU run ~400x slower than fp32")
        rows.append(row)
    est = Estimate(
        recipe=recipe,
        shape=shape,
        tasks=tasks,
        shares=shares,
        worst=worst,
        device=dev.type,
        peaks=peaks,
        states=states,
        rows=rows,
        runtime_bytes=runtime_bytes,
        available_bytes=available_memory(dev),
        ranks=ranks,
        priced=priced,
    )
    for row in est.rows:
        row.warmup = _warmup(est, row)
        row.warmup_cold = _warmup(est, row, pool=False)
    _add_notes(est)
    return est


def heap_released(recipe: Recipe) -> bool:
    """Whether a CPU run of `recipe` gives the heap's free pages back around every
    evaluation: `train.cpu_heap` on, on Linux with glibc, and no MALLOC_* variable set
    (train/cpu_heap.py applies its settings under the same conditions)."""
    import sys

    from bitblend.procmem import user_malloc_settings

    if not recipe.train.cpu_heap or not sys.platform.startswith("linux"):
        return False
    return not user_malloc_settings()


def _warmup(est: Estimate, row: Row, pool: bool = True) -> float:
    """Seconds a CPU run spends faulting in pages: the growth from the runtime (held before
    the first step) to the process peak, and on a tuned heap the pages every evaluation's
    releases give back and take again (docs/estimate.md, "warm-up").

    Growth takes pages the guest has free. In a VM whose host backs guest memory lazily
    those freed lately are still backed (the recycled pool: ~1-2 us a page here) and the
    rest cost a host fault each (12-30 us). The probe measures both costs and the pool's
    size now; the growth is priced from the pool up to its size and cold past it
    (`pool=False`: all cold, a machine whose memory has not been touched lately).

    The releases (`train.cpu_heap`: the heap's free pages go back at every evaluation's
    start and end, train/cpu_heap.py) are the transient bytes of a step and of an
    evaluation with the allocator's slack (large-eval-file: 122k extra faults per
    evaluation measured, 130k counted so). They come back within the same second from the
    pages just freed, so they are priced at the recycled cost: the users' evaluations
    faulted 150-200k pages each at ~2-3 us (an evaluation without them ran as fast per
    token), not at the 15-30 us a host fault costs."""
    from bitblend.estimate.first_touch import PAGE

    peaks = est.peaks
    if est.device != "cpu" or not peaks.page_fault:
        return 0.0
    recycled = peaks.recycled_page or peaks.page_fault  # an older cache entry: all cold
    grown = max(0, est.total_bytes(row) - est.runtime_bytes)
    warm = min(grown, peaks.recycled_bytes) if pool and peaks.recycled_page else 0
    seconds = (warm * recycled + (grown - warm) * peaks.page_fault) / PAGE
    if row.evals and est.recipe.train.cpu_heap:
        transient = row.memory.peak + row.high_water.eval - 2 * row.memory.resident
        seconds += row.evals * transient * (1 + CPU_ALLOCATOR_SLACK) / PAGE * recycled
    return seconds


def _runtime(
    recipe: Recipe,
    device: torch.device,
    how: str,
    ranks: int,
    datas: list[Any],
    lengths: list[TaskLengths | None] | None,
) -> tuple[int, list[TaskLengths | None], int]:
    """The CPU process's resident bytes before the model (0 on GPUs: tensors only count),
    each task's token lengths and the end of the run's bytes outside the heap: all from
    the runtime child (`measure`, CPU), else this process's RSS (taken before it encodes
    anything), lengths encoded here and no end-of-run term (measuring it here would
    import matplotlib into the caller)."""
    from bitblend.estimate.runtime import encoded_lengths, measure_runtime

    if device.type == "cpu" and how == "measure":
        child = measure_runtime(recipe, ranks)
        return child.bytes, child.lengths if lengths is None else lengths, child.end
    rss = process_resident_bytes() if device.type == "cpu" else 0
    return rss, encoded_lengths(recipe, datas) if lengths is None else lengths, 0


def _priced(
    recipe: Recipe,
    tasks: list[TaskShape],
    shares: list[float],
    lengths: list[TaskLengths | None],
    counts: list[int] | None = None,
) -> list[PricedLengths]:
    """Each task's priced lengths under train's batching: homogeneous steps run its
    micro-batches; a mixed step cuts its share of the batch out of the task's sampler's
    batches (step.py's `take`). `counts`: each task's steps in the run (estimate/draws.py),
    which are then priced at the very batches they draw."""
    cfg = recipe.train
    mixed = recipe.mixing.batches == "mixed"
    out = []
    for i, (task, t, share) in enumerate(zip(recipe.tasks, tasks, shares, strict=True)):
        piece = max(1, round(share * cfg.batch_size)) if mixed else t.batch
        known = lengths[i] if i < len(lengths) else None
        text_worst = 0  # tasks without text: every row the same positions
        if known is not None and known.train:
            longest = task.max_length or recipe.model.max_length
            text_worst = math.ceil(longest / cfg.pad_to_multiple_of) * cfg.pad_to_multiple_of
        out.append(
            priced_lengths(
                t,
                known,
                piece=piece,
                global_batch=t.batch * cfg.grad_accum,
                multiple=cfg.pad_to_multiple_of,
                eval_batch=cfg.eval_batch_size,
                seed=cfg.seed,
                stream=i,
                group_by_length=cfg.group_by_length,
                text_worst=text_worst,
                batches=counts[i] if counts else 0,
            )
        )
    return out


def _per_rank(
    shape: ModelShape,
    task: TaskShape,
    spec: PrecisionSpec,
    states: int,
    device: str,
    fused: bool,
    ranks: int,
    accum: int,
) -> list[RankBytes]:
    """DDP and FSDP2 per rank: each rank runs ceil(batch / N) of the global micro-batch."""
    local = replace(task, batch=max(1, math.ceil(task.batch / ranks)))
    base = peak_bytes(shape, local, spec, states, device, fused)
    return per_rank(shape, spec, base, ranks, accum, local.batch)


def run_length(recipe: Recipe, tasks: list[TaskShape]) -> tuple[int, int]:
    """(optimizer steps, evaluations) of a run, as the trainer counts them: an evaluation
    every train.eval_every steps before the last, and one at the end."""
    from bitblend.data.epochs import steps_for_epochs

    cfg = recipe.train
    steps = cfg.steps
    if cfg.epochs is not None:  # the trainer's rule, from the sizes recipe_shapes read
        steps = steps_for_epochs(recipe, [t.train_examples for t in tasks])
    evals = 1 + ((steps - 1) // cfg.eval_every if cfg.eval_every else 0)
    return steps, evals


def _add_notes(est: Estimate) -> None:
    """Warnings a user should read before the run: does not fit, odd rank counts."""
    threads = torch.get_num_threads()
    for row in est.rows:
        need = est.total_bytes(row)
        if est.available_bytes and need > est.available_bytes:
            ckpt = est.total_bytes(row, checkpointed=True)
            hint = (
                "fits with activation checkpointing"
                if ckpt <= est.available_bytes
                else "lower train.batch_size or model.max_length"
            )
            row.warnings.append(
                f"does not fit: needs {need / 2**30:.1f} GiB, "
                f"{est.available_bytes / 2**30:.1f} GiB available ({hint})"
            )
    if est.ranks > 1 and est.device == "cpu":
        est.notes.append(
            f"--ranks {est.ranks}: per-rank figures assume one device per rank; "
            f"this machine runs {threads} CPU threads and has no GPU"
        )
    if est.shape.family == "generic":
        est.notes.append(
            f"{est.shape.family} architecture: activations follow the BERT block layout "
            "(an approximation)"
        )


def run_performance(
    model: Any,
    tokens: int,
    examples: int,
    lm_tokens: int,
    seconds: float,
    device: torch.device,
    compute_dtype: str,
    best_tokens_per_s: float = 0.0,
) -> dict[str, Any]:
    """Achieved FLOP/s and MFU of `tokens` trained in `seconds` (the same steps), against
    this machine's probed peak of the run's compute dtype.

    The peak comes from the probe cache unless it is stale, was taken while the machine was
    busier, or the run beat it - on average, or in its fastest step (`best_tokens_per_s`,
    at the run's FLOPs per token): then the machine is probed again and the best reading
    kept (estimate/probe.py). When even the new probe reads below the run's average, no
    MFU is reported (`mfu_note` says why) rather than a ratio above 1 or a clamped one.
    """
    specs = list(getattr(model, "specs", {}).values())
    shape = shape_from_config(model.backbone.config, specs)
    flops = tokens_flops(shape, tokens, examples, lm_tokens)
    achieved = flops / seconds if seconds > 0 else 0.0
    best = flops / tokens * best_tokens_per_s if tokens else 0.0
    peaks = get_peaks(device, budget=1.0, touch=False)  # no mappings on top of the run's
    peaks = confirm_peak(device, peaks, compute_dtype, max(achieved, best))
    peak = peaks.flops(compute_dtype)
    out: dict[str, Any] = {
        "train_flops": float(flops),
        "flops_per_s": achieved,
        "best_step_flops_per_s": best,
        "peak_flops_per_s": peak,
        "mfu": achieved / peak if peak else None,
        "probe": peaks.conditions(),
    }
    if peak and achieved > peak:
        out["mfu"] = None
        out["mfu_note"] = (
            f"not reported: the run's {achieved / 1e9:.3g} GFLOP/s beat a fresh probe's "
            f"{peak / 1e9:.3g} ({compute_dtype}); the model FLOP count or the probe is off"
        )
    return out


__all__ = [
    "Estimate",
    "Row",
    "backbone_config",
    "bytes_per_param",
    "estimate_recipe",
    "recipe_shapes",
    "run_performance",
    "shape_from_config",
]
