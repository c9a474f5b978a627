"""The estimate as rich tables for people and as JSON for programs."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from bitblend.estimate import Estimate, Row
from bitblend.estimate.lengths import PricedLengths
from bitblend.estimate.memory import CPU_ALLOCATOR_SLACK, bytes_per_param


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, as memory is sold and reported."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_flops(n: float) -> str:
    """FLOPs with an SI prefix: 2.9e11 -> '290 GFLOP'."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} FLOP"


def short_flops(n: float) -> str:
    """FLOPs in SI units for narrow tables: 151M, 275G, 1.2T."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.1f}{unit}" if v < 9.95 else f"{v:.0f}{unit}"
    return f"{n:.0f}"


def human_seconds(s: float) -> str:
    """Seconds for a step: ms below one second."""
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def row_json(est: Estimate, row: Row) -> dict[str, Any]:
    """One precision row as plain JSON values (bytes, FLOPs, seconds)."""
    m = row.memory
    spec = row.spec
    return {
        "precision": spec.name,
        "selected": row.selected,
        "hypothetical": spec.hypothetical,
        "note": spec.note,
        "bytes_per_param": _per_param(est, row),
        "dtypes": {
            "weight_bytes": spec.weight_bytes,
            "grad_bytes": spec.grad_bytes,
            "master_weights": spec.master,
            "state_bits": spec.state_bits,
            "compute": spec.compute_dtype,
        },
        "memory": {
            "weights": m.static.weights,
            "grads": m.static.grads,
            "master": m.static.master,
            "optimizer_states": m.static.states,
            "activations": m.activations,
            "activations_checkpointed": m.activations_checkpointed,
            "temporary": m.temporary,
            "optimizer_step_extra": m.step_extra,
            "peak": m.peak,
            "peak_checkpointed": m.peak_checkpointed,
            # beyond the step: conversion leftovers, an evaluation's peak, the save
            "build": row.high_water.build,
            "eval_peak": row.high_water.eval,
            "save": row.high_water.save,
            "checkpoint_peak": row.high_water.checkpoint_live,
            # CPU, a whole run: oneDNN's kernels for every matmul shape the run meets
            # (estimate/kernel_cache.py), and the end of the run's pages (baselines,
            # report) on top (estimate/wholerun.py)
            "kernel_cache": row.high_water.kernel_cache,
            "end_of_run": row.high_water.end,
            "process_peak": est.total_bytes(row),
            "process_peak_checkpointed": est.total_bytes(row, checkpointed=True),
        },
        "flops_per_step": row.flops.total,
        "flops_per_step_checkpointed": row.flops.total_checkpointed,
        "flops_forward_parts": row.flops.parts,
        "time_per_step_s": row.time.total,
        "time_parts_s": row.time.parts,
        "mean_time_per_step_s": row.mean_time,
        "eval_time_s": row.eval_time,
        "run": {
            "steps": row.steps,
            "evals": row.evals,
            "warmup_s": row.warmup,  # CPU page faults: growth, re-faults after releases
            "warmup_cold_s": row.warmup_cold,  # the same with no recycled pages to grow into
            "time_s": row.run_time,
        },
        "per_rank": [{**asdict(r), "process_peak": est.rank_bytes(row, r)} for r in row.ranks],
        "warnings": row.warnings,
    }


def to_json(est: Estimate) -> dict[str, Any]:
    """The whole estimate: model, tasks, probe and one entry per precision."""
    shape = est.shape
    worst = est.tasks[est.worst]
    return {
        "recipe": est.recipe.name,
        "backbone": est.recipe.model.backbone,
        "device": est.device,
        "model": {
            "family": shape.family,
            "parameters": shape.params,
            "trunk_parameters": shape.trunk_params,
            "head_parameters": shape.head_params,
            "own_embedding_parameters": shape.own_embedding_params,
            "trainable_parameters": shape.trainable[0],
            "adapter": asdict(shape.adapter) if shape.adapter else None,
            "fp32_kept_parameters": shape.fp32_params,
            "hidden": shape.hidden,
            "layers": shape.layers,
            "heads": shape.heads,
            "intermediate": shape.intermediate,
            "vocab": shape.vocab,
            "attention": _backend(est),
        },
        "tasks": [
            {**asdict(t), "tokens": t.tokens, "share": share, "priced": _priced_json(p)}
            for t, share, p in zip(est.tasks, est.shares, _priced_list(est), strict=True)
        ],
        "worst_task": worst.name,
        "batch": worst.batch,
        "seq": worst.seq,
        "grad_accum": est.recipe.train.grad_accum,
        "optimizer": {"name": est.recipe.optimizer.name, "states": est.states},
        "ranks": est.ranks,
        "runtime_bytes": est.runtime_bytes,
        "available_bytes": est.available_bytes,
        "probe": asdict(est.peaks),
        "rows": [row_json(est, r) for r in est.rows],
        "notes": est.notes,
    }


def _priced_list(est: Estimate) -> list[PricedLengths | None]:
    return list(est.priced) if est.priced else [None] * len(est.tasks)


def _priced_json(p: PricedLengths | None) -> dict[str, Any] | None:
    """The positions a task's time is priced at (estimate/lengths.py); `seq` is memory's."""
    if p is None:
        return None
    return {
        "source": p.source,  # data | fixed (no text) | worst (lengths unknown: max_length)
        "mean_train_positions": p.mean_train,  # expected padded micro-batch length
        "mean_eval_positions": p.mean_eval,
        "worst_positions": p.worst,
        # global batches of the run priced one by one (its own draws); 0: the sampler's
        # long-run distribution
        "run_batches": p.run_batches,
        "train_positions": {str(k): v for k, v in p.train.items()},  # length -> probability
        "eval_batches": [[b, L, k] for (b, L), k in sorted(p.eval.items())],  # examples, L, n
    }


def priced_line(est: Estimate) -> str | None:
    """What lengths the time is priced at, for people: 'mean padded length 41 of 128'."""
    parts, fixed, worst = [], [], []
    for task, p in zip(est.tasks, _priced_list(est), strict=True):
        if p is None or p.source == "worst":
            worst.append(task.name)
            continue
        if p.source == "fixed":
            fixed.append(f"{task.name} {p.worst}")
            continue
        notes = [f"eval {p.mean_eval:.0f}"] if p.eval else []
        if p.run_batches:  # a short run: priced at the very batches it draws
            notes.append(f"the run's {p.run_batches} batches")
        parts.append(
            f"{task.name} {p.mean_train:.0f} of {p.worst}"
            + (f" ({', '.join(notes)})" if notes else "")
        )
    if not parts:
        return None
    cfg = est.recipe.train
    how = "length-grouped batches" if cfg.group_by_length else "random batches"
    line = (
        f"time priced at the data's lengths - mean padded length per step: {', '.join(parts)} "
        f"({how}, padded to the longest row, multiple of {cfg.pad_to_multiple_of})"
    )
    if fixed:
        line += f"; every row the same: {', '.join(fixed)}"
    if worst:
        line += f"; lengths unknown, at full length: {', '.join(worst)}"
    return line


def _backend(est: Estimate) -> str:
    """The attention that runs: bitblend (its own CPU kernel), math or flash (SDPA)."""
    from bitblend.estimate.memory import attention_backend

    return attention_backend(est.shape, est.device)


ATTENTION_NAMES = {
    "bitblend": "bitblend's CPU attention (model.kernels=auto)",
    "math": "math SDPA (CPU, dropout)",
    "flash": "flash SDPA",
}


def _name(row: Row) -> str:
    return ("*" if row.selected else "") + row.spec.name + ("?" if row.spec.hypothetical else "")


def _per_param(est: Estimate, row: Row) -> float:
    """Model-state bytes per parameter: the recipe's per-parameter figure, or for a LoRA
    run (frozen base without grads or states) the whole model state over every parameter."""
    if est.shape.adapter is None:
        return bytes_per_param(row.spec, est.states)
    return row.memory.static.total / max(est.shape.params, 1)


def short_bytes(n: float) -> str:
    """Compact binary units for narrow tables: 3.9M, 86M, 1.2G, 0."""
    if n == 0:
        return "0"
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 999.5 or unit == "T":
            return f"{n:.1f}{unit}" if unit and abs(n) < 9.95 else f"{n:.0f}{unit}"
        n /= 1024
    return f"{n:.0f}T"


def render(est: Estimate, console: Console) -> None:
    """A header, a memory table, a compute table and the warnings under them."""
    shape, worst = est.shape, est.tasks[est.worst]
    p = est.peaks
    attention = ATTENTION_NAMES[_backend(est)]
    own = shape.own_embedding_params
    own_text = f", own-vocabulary embeddings {own:,}" if own else ""
    console.print(
        f"[bold]bitblend estimate[/] {est.recipe.name}: {est.recipe.model.backbone} "
        f"({shape.family}, {shape.params:,} params: trunk {shape.trunk_params:,}, heads and "
        f"adapters {shape.head_params:,}{own_text}), {est.recipe.optimizer.name} "
        f"({est.states} states/param), {est.device}"
    )
    ad = shape.adapter
    if ad is not None:
        base = "as the recipe's weights" if ad.base_bits is None else f"in {ad.base_bits} bits"
        console.print(
            f"LoRA r {ad.r} ({ad.adapters} adapter(s), {ad.lora_params:,} params): "
            f"{shape.trainable[0]:,} trainable, {ad.frozen_params:,} frozen (no grads or "
            f"optimizer state), frozen base stored {base}"
        )
    console.print(
        f"worst step: task {worst.name}, batch {worst.batch} x seq {worst.seq} "
        f"x {est.recipe.train.grad_accum} micro-batch(es), {attention}"
    )
    line = priced_line(est)
    if line:
        console.print(line)
    probe = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in p.matmul_flops.items())
    age_h = max(0.0, time.time() - p.measured_at) / 3600
    how = (
        f"cached, {age_h:.1f} h old" if p.cached else f"measured in {p.seconds:.1f}s"
    ) + f", load {p.load_avg:.2f} on {p.cpus} CPUs then"
    now = (
        f"; the machine gives {p.speed:.0%} of it now (times are priced at that)"
        if p.speed < 0.995
        else ""
    )
    console.print(f"probe ({how}): GFLOP/s {probe}; {p.bandwidth / 1e9:.0f} GB/s{now}")
    mem = Table(
        title="live tensor bytes per step (* the recipe's own settings)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    # Only the name column may wrap: numbers stay whole on an 80-column terminal.
    mem.add_column("precision", overflow="fold")
    for col in ("B/p", "weights", "grads", "master", "states", "activ", "temp", "peak"):
        mem.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    for row in est.rows:
        m = row.memory
        mem.add_row(
            _name(row),
            f"{_per_param(est, row):.1f}",
            *(
                short_bytes(x)
                for x in (
                    m.static.weights,
                    m.static.grads,
                    m.static.master,
                    m.static.states,
                    m.activations,
                    m.temporary_total,
                    m.peak,
                )
            ),
        )
    console.print(mem)
    comp = Table(
        title=f"checkpointing, process, compute; per rank with {est.ranks} rank(s)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    comp.add_column("precision", overflow="fold")
    for col in ("ckpt peak", "process", "FLOP/step", "time/step", "DDP", "FSDP2"):
        comp.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    for row in est.rows:
        ranks = {r.strategy: r for r in row.ranks}
        comp.add_row(
            _name(row),
            short_bytes(row.memory.peak_checkpointed),
            short_bytes(est.total_bytes(row)),
            short_flops(row.flops.total),
            human_seconds(row.time.total),
            short_bytes(ranks["ddp"].peak),
            short_bytes(ranks["fsdp2"].peak),
        )
    console.print(comp)
    if len(est.tasks) > 1:
        console.print(
            "mean step over tasks (target shares): "
            + ", ".join(f"{_name(r)} {human_seconds(r.mean_time)}" for r in est.rows[:4])
        )
    for r in [r for r in est.rows if r.selected][:1] or est.rows[:1]:
        if est.ranks > 1:
            parts = [
                f"{k.strategy.upper()} peak {short_bytes(k.peak)} (process "
                f"{short_bytes(est.rank_bytes(r, k))}), sends {short_bytes(k.comm_bytes)}"
                for k in r.ranks
            ]
            console.print(
                f"per rank ({_name(r)}, {est.ranks} ranks, {r.ranks[0].batch} example(s) of "
                f"the global micro-batch each): " + "; ".join(parts) + " per step"
            )
        warm = ""
        if r.warmup:
            cold = (
                f"; {human_seconds(r.warmup_cold)} on memory not touched lately"
                if r.warmup_cold > 1.2 * r.warmup
                else ""
            )
            warm = f" + warm-up {human_seconds(r.warmup)} (page faults{cold})"
        console.print(
            f"whole run ({_name(r)}): {r.steps} steps x {human_seconds(r.mean_time)} + "
            f"{r.evals} eval(s) x {human_seconds(r.eval_time)}{warm} = "
            f"{human_seconds(r.run_time)} (plus loading, checkpoints and the report)"
        )
    if est.device == "cpu":
        console.print(
            f"process = resident runtime ({short_bytes(est.runtime_bytes)}: python, torch, "
            f"transformers, data) + the worse of the step's peak x "
            f"{1 + CPU_ALLOCATOR_SLACK:.2f} (blocks malloc keeps) and an eval's (x1 where "
            "the heap's free pages go back at its start) + bf16 kernels per shape + "
            "base conversion + save + the end of the run (baselines, report); "
            "LoRA runs and ranks: resident state once, a step's transient bytes x2 "
            "(x3 under FSDP2), the heap's layouts (docs/estimate.md)"
        )
    for row in est.rows:
        for w in row.warnings:
            console.print(f"[yellow]warning[/] {row.spec.name}: {w}")
    for note in est.notes:
        console.print(f"[yellow]note[/] {note}")
