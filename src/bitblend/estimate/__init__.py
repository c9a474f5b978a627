"""`bitblend estimate`: what a recipe will cost before it runs - parameters, bytes, FLOPs and
time per step - under each precision recipe, on this machine and per rank.

One module per concern: shapes.py (the model's sizes, from its config), memory.py
(bytes), flops.py (FLOPs and time), probe.py (this machine's measured peaks), report.py
(tables and JSON). This file puts them together for a recipe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bitblend.config.schema import Recipe
from bitblend.device import pick_device
from bitblend.errors import BitblendError
from bitblend.estimate.flops import StepFlops, StepTime, step_flops, step_time, tokens_flops
from bitblend.estimate.memory import (
    CPU_ALLOCATOR_SLACK,
    RECIPES,
    PeakBytes,
    PrecisionSpec,
    RankBytes,
    activation_bytes,
    bytes_per_param,
    optimizer_states,
    peak_bytes,
    per_rank,
    precision_spec,
    what_if_specs,
)
from bitblend.estimate.probe import Peaks, get_peaks
from bitblend.estimate.shapes import (
    ModelShape,
    TaskShape,
    backbone_config,
    recipe_shapes,
    shape_from_config,
)


# -- the estimate ------------------------------------------------------------------------
@dataclass
class Row:
    """One precision recipe's costs for the recipe's worst-case task."""

    spec: PrecisionSpec
    selected: bool  # the recipe's own precision (auto resolved)
    memory: PeakBytes
    flops: StepFlops
    time: StepTime
    mean_time: float  # per step, averaged over tasks by their target shares
    ranks: list[RankBytes]
    warnings: list[str] = field(default_factory=list)


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

    def total_bytes(self, row: Row, checkpointed: bool = False) -> int:
        """What the process will hold at its peak: runtime + tensors (+ CPU allocator slack)."""
        tensors = row.memory.peak_checkpointed if checkpointed else row.memory.peak
        if self.device != "cpu":
            return tensors  # CUDA allocator peak: tensors only
        return self.runtime_bytes + round(tensors * (1 + CPU_ALLOCATOR_SLACK))


def resolve_precision(recipe: Recipe, device: torch.device) -> str:
    """The concrete recipe `precision.recipe` stands for on `device` (`auto` resolved)."""
    from bitblend.precision.recipes import cpu_bf16_native, resolve_auto

    name: str = recipe.precision.recipe
    if name != "auto":
        return name
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return resolve_auto(device.type, cpu_bf16_native(), cuda_bf16)


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
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 + process_resident_bytes()
    except (OSError, ValueError):
        pass
    return 0


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
            own, master_weights=pc.master_weights, state_bits=pc.state_bits, rounding=pc.rounding
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
) -> Estimate:
    """Estimate memory, FLOPs and time per step of `recipe` under each precision."""
    if ranks < 1:
        raise BitblendError(f"--ranks {ranks}: expected an integer >= 1")
    dev = device or pick_device(recipe.train.device)
    shape, tasks, shares = recipe_shapes(recipe)
    states = optimizer_states(recipe.optimizer.name, recipe.optimizer.momentum)
    fused = recipe.optimizer.name in ("adam", "adamw")
    peaks = peaks or get_peaks(dev)
    own = resolve_precision(recipe, dev)
    pc = recipe.precision
    own_spec = precision_spec(
        own, master_weights=pc.master_weights, state_bits=pc.state_bits, rounding=pc.rounding
    )
    accum = recipe.train.grad_accum
    rows: list[Row] = []
    worst = 0
    for spec in precision_specs(recipe, precision, dev):
        per_task = [peak_bytes(shape, t, spec, states, dev.type, fused) for t in tasks]
        worst = max(range(len(tasks)), key=lambda k: (per_task[k].peak, tasks[k].tokens))
        task = tasks[worst]
        times = [
            step_time(
                shape,
                t,
                spec,
                activation_bytes(shape, t, spec, dev.type),
                peaks,
                grad_accum=accum,
                states=states,
                device=dev.type,
            )
            for t in tasks
        ]
        row = Row(
            spec=spec,
            selected=_same(spec, own_spec),
            memory=per_task[worst],
            flops=step_flops(shape, task, accum),
            time=times[worst],
            mean_time=sum(s * t.total for s, t in zip(shares, times, strict=True)),
            ranks=per_rank(shape, spec, per_task[worst], ranks),
        )
        if spec.name == "16-mixed" and dev.type == "cpu":
            row.warnings.append("fp16 matmuls on CPU run ~400x slower than fp32")
        if recipe.model.adapter.kind != "none":  # docs/peft.md: not modelled yet
            row.warnings.append(
                "model.adapter: priced as a full fine-tune (LoRA and a frozen low-bit base "
                "are not modelled: the run's summary.json measures its model state)"
            )
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
        runtime_bytes=process_resident_bytes() if dev.type == "cpu" else 0,
        available_bytes=available_memory(dev),
        ranks=ranks,
    )
    _add_notes(est)
    return est


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
) -> dict[str, float | None]:
    """Achieved FLOP/s and MFU of a finished run, against this machine's probed peak of
    the run's compute dtype (cached; a first run probes for about a second)."""
    specs = list(getattr(model, "specs", {}).values())
    shape = shape_from_config(model.backbone.config, specs)
    flops = tokens_flops(shape, tokens, examples, lm_tokens)
    peak = get_peaks(device, budget=1.0).flops(compute_dtype)
    achieved = flops / seconds if seconds > 0 else 0.0
    return {
        "train_flops": float(flops),
        "flops_per_s": achieved,
        "peak_flops_per_s": peak,
        "mfu": achieved / peak if peak else None,
    }


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
