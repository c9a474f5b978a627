"""`bitblend doctor`: a dry run of a few batches that measures per-layer numerics in fp32 and
says which low-precision recipe the model can take and which layers to keep in fp32.

For every leaf module it records the output (activation) and the gradient flowing back into
that output: amax, the share of values fp16 cannot hold (|x| > 65504 overflows; nonzero
|x| < 2^-24, fp16's smallest subnormal, flushes to zero) and the share above e4m3's 448
(what an unscaled fp8 cast would saturate). Measured in fp32, so the numbers describe the
model and data, not an already-lossy format.

This module measures and judges; the dry run itself (building the model and data as a run
would, running the batches) is train/probe.py's, so precision/ never imports train/.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.table import Table
from torch import nn

from bitblend.config.schema import Recipe

FP16_MAX = 65504.0
FP16_MIN_SUBNORMAL = 2.0**-24
E4M3_MAX = 448.0
# Per-tensor fp8 scaling maps amax to 448; values below amax / 2^17 (under e4m3's smallest
# subnormal, 2^-9, after scaling) vanish. An amax this far above the tensor's RMS means
# outliers stretch the scale and the bulk of the values lose their precision.
FP8_OUTLIER_RATIO = 2.0**9


@dataclass
class Stat:
    """Running numerics of one tensor stream (a layer's outputs or output gradients)."""

    amax: float = 0.0
    count: int = 0
    sq_sum: float = 0.0
    over_fp16: int = 0
    under_fp16: int = 0
    over_e4m3: int = 0

    def add(self, t: torch.Tensor) -> None:
        """Fold one tensor in (non-finite values count as overflow)."""
        a = t.detach().float().abs()
        finite = torch.isfinite(a)
        self.amax = max(self.amax, float(torch.where(finite, a, 0).max()) if a.numel() else 0.0)
        self.count += a.numel()
        self.sq_sum += float(torch.where(finite, a, 0).pow(2).sum())
        self.over_fp16 += int(((a > FP16_MAX) | ~finite).sum())
        self.under_fp16 += int(((a > 0) & (a < FP16_MIN_SUBNORMAL)).sum())
        self.over_e4m3 += int(((a > E4M3_MAX) | ~finite).sum())

    def to_json(self) -> dict[str, float]:
        """Shares rather than counts, plus amax and RMS."""
        n = max(self.count, 1)
        return {
            "amax": self.amax,
            "rms": math.sqrt(self.sq_sum / n),
            "fp16_overflow": self.over_fp16 / n,
            "fp16_underflow": self.under_fp16 / n,
            "e4m3_saturated": self.over_e4m3 / n,
        }


@dataclass
class LayerStats:
    """Activation and gradient numerics of one leaf module."""

    name: str
    kind: str
    act: Stat = field(default_factory=Stat)
    grad: Stat = field(default_factory=Stat)


@dataclass
class DoctorReport:
    """Everything `bitblend doctor` prints or writes as JSON."""

    recipe: str
    batches: int
    layers: list[LayerStats]
    recommended_recipe: str
    keep_fp32: list[str]
    findings: list[str]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "recipe": self.recipe,
            "batches": self.batches,
            "recommended_recipe": self.recommended_recipe,
            "keep_fp32": self.keep_fp32,
            "findings": self.findings,
            "layers": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "activation": s.act.to_json(),
                    "gradient": s.grad.to_json(),
                }
                for s in self.layers
            ],
        }


def attach_stats(model: nn.Module, stats: dict[str, LayerStats]) -> list[Any]:
    """Hooks that fold every leaf module's outputs and output gradients into `stats`;
    returns the handles (remove them when done)."""
    handles = []
    for name, module in model.named_modules():
        if not name or any(True for _ in module.children()) or isinstance(module, nn.Dropout):
            continue  # containers repeat their children; dropout only rescales its input
        # A Linear subclass (fused q/k/v, models/fused_qkv.py) is still a Linear to fp8.
        kind = "Linear" if isinstance(module, nn.Linear) else type(module).__name__
        entry = stats.setdefault(name, LayerStats(name, kind))

        def fwd(_m: nn.Module, _i: Any, out: Any, entry: LayerStats = entry) -> None:
            t = out[0] if isinstance(out, tuple) else out
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                return
            entry.act.add(t)
            if t.requires_grad:
                t.register_hook(lambda g, entry=entry: entry.grad.add(g))

        handles.append(module.register_forward_hook(fwd))
    return handles


def judge(
    recipe: Recipe,
    batches: int,
    layers: list[LayerStats],
    bf16_native: bool,
    fp16_fast: bool = True,
) -> DoctorReport:
    """Findings, a recommended recipe and keep_fp32 list from measured layer numerics.

    `fp16_fast`: the device has fast fp16 matmuls (CUDA). A CPU has none (FP16_CPU_WARNING:
    ~400x slower than fp32 here), so a CPU without native bf16 is recommended 32-true, what
    `auto` picks there, never the 16-mixed its numerics would allow."""
    findings: list[str] = []
    over = [s.name for s in layers if s.act.over_fp16 or s.grad.over_fp16]
    grad_n = sum(s.grad.count for s in layers)
    under = sum(s.grad.under_fp16 for s in layers) / max(grad_n, 1)
    if over:
        findings.append(
            f"{len(over)} layer(s) exceed fp16's 65504 (first: {over[0]}): 16-mixed would "
            "overflow there whatever the loss scale"
        )
    if under > 0.001:
        findings.append(
            f"{under:.2%} of gradient values are below fp16's smallest subnormal (2^-24): "
            "16-mixed needs loss scaling (bf16 does not: its range equals fp32's)"
        )
    # fp8 candidates are the trunk's Linear layers; flag those whose outliers stretch a
    # per-tensor scale or that already saturate e4m3 unscaled by a large margin.
    keep = []
    for s in layers:
        if s.kind != "Linear" or not s.name.startswith("backbone."):
            continue
        rms = s.act.to_json()["rms"]
        if s.act.over_fp16 or (rms > 0 and s.act.amax / rms > FP8_OUTLIER_RATIO):
            keep.append(s.name)
    if keep:
        findings.append(
            f"{len(keep)} Linear layer(s) have activation outliers (amax/RMS > "
            f"{FP8_OUTLIER_RATIO:.0f} or beyond fp16): keep them out of fp8 with "
            "precision.keep_fp32"
        )
    if bf16_native:
        rec = "bf16-mixed"
    elif fp16_fast and not over:
        rec = "16-mixed"
    else:
        rec = "32-true"
    if not findings:
        findings.append("no numerics problem found in these batches")
    if not bf16_native and not fp16_fast:
        findings.append(
            "this device has neither native bf16 (AVX512-BF16 or AMX) nor fast fp16 "
            "matmuls: 32-true is the fast recipe here (what precision.recipe auto picks)"
        )
    return DoctorReport(recipe.name, batches, layers, rec, keep, findings)


def render(report: DoctorReport, console: Any, limit: int = 25) -> None:
    """A rich table of the riskiest layers plus findings and recommendations."""

    def risk(s: LayerStats) -> tuple[float, float]:
        return (s.act.over_fp16 + s.grad.over_fp16 + s.act.over_e4m3, s.act.amax)

    rows = sorted(report.layers, key=risk, reverse=True)[:limit]
    table = Table(title=f"doctor {report.recipe}: {report.batches} batch(es) per task, fp32")
    table.add_column("layer", overflow="fold", ratio=3)
    for col in ("act amax", ">448", "grad amax", "<2^-24", "grad >448"):
        table.add_column(col, justify="right", no_wrap=True)
    for s in rows:
        a, g = s.act.to_json(), s.grad.to_json()
        table.add_row(
            f"{s.name} ({s.kind})", f"{a['amax']:.3g}", f"{a['e4m3_saturated']:.1%}",
            f"{g['amax']:.3g}", f"{g['fp16_underflow']:.1%}", f"{g['e4m3_saturated']:.1%}",
        )  # fmt: skip
    console.print(table)
    console.print(
        ">448: share above e4m3's max (unscaled fp8 saturates); <2^-24: nonzero share below "
        "fp16's smallest subnormal (flushes to zero without loss scaling)"
    )
    if len(report.layers) > limit:
        console.print(f"({len(report.layers) - limit} more layers in --json)")
    for f in report.findings:
        console.print(f"- {f}")
    console.print(f"recommended: precision.recipe: {report.recommended_recipe}")
    if report.keep_fp32:
        console.print(f"recommended: precision.keep_fp32: {report.keep_fp32}")
