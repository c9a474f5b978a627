"""A small probe API over the training setup: the model, tasks and precision a run would
build, and fp32 forward/backward batches without an optimizer step.

`bitblend doctor` uses it (precision/doctor.py measures and judges; this module runs), so
the doctor builds no Trainer (no optimizer, low-bit states, mixture or run directory) and
precision/ never imports train/.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from bitblend.config.schema import Recipe
from bitblend.device import pick_device
from bitblend.models.trunk import MultiTaskModel
from bitblend.precision.base import Precision
from bitblend.precision.doctor import DoctorReport, LayerStats, attach_stats, judge
from bitblend.precision.recipes import bf16_native as device_bf16_native
from bitblend.precision.recipes import build_precision
from bitblend.tasks.balancing import Balancer
from bitblend.taskspec import load_data
from bitblend.train import step as step_fn
from bitblend.train.setup import TaskRuntime, build_model, build_tasks, convert_model


@dataclass
class Probe:
    """What a run of `recipe` would train: model, per-task runtimes, precision, balancer."""

    recipe: Recipe
    model: MultiTaskModel
    tasks: list[TaskRuntime]
    precision: Precision
    balancer: Balancer
    device: torch.device

    def run_batches(self, batches: int) -> None:
        """`batches` micro-batches per task: forward, backward, gradients cleared; no step."""
        self.model.train()
        for b in range(batches):
            for i in range(len(self.tasks)):
                step_fn.homogeneous(
                    self.model, self.precision, self.balancer, self.tasks, i, b,
                    self.recipe.train.seed, 1,
                )  # fmt: skip
                self.model.zero_grad(set_to_none=True)


def build_probe(recipe: Recipe) -> Probe:
    """Build `recipe`'s model and tasks as `train` would (same checks, same errors)."""
    cfg = recipe.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    precision = build_precision(recipe.precision, device, cfg.seed)
    datas = load_data(recipe)
    model, tokenizer, task_tokenizers = build_model(recipe, datas)
    tasks = build_tasks(
        recipe, datas, model, tokenizer, task_tokenizers, precision.forward_context, device
    )
    convert_model(model, recipe, precision)
    mix = recipe.mixing
    balancer = Balancer(mix.balancing, [t.cfg.weight for t in tasks], mix.balancing_lr)
    return Probe(recipe, model, tasks, precision, balancer, device)


def diagnose(
    recipe: Recipe,
    batches: int = 2,
    *,
    model_hook: Any = None,
    bf16_native: bool | None = None,
    fp16_fast: bool | None = None,
) -> DoctorReport:
    """Run `batches` fp32 training batches per task (no optimizer step) and judge numerics.

    `model_hook(model)` may modify the built model first (tests inject a faulty layer).
    `bf16_native` / `fp16_fast` default to what the device has (tests judge the same
    numerics for another device).
    """
    fp32 = replace(recipe.precision, recipe="32-true", state_bits=32, keep_fp32=[])
    probe = build_probe(replace(recipe, precision=fp32))
    if model_hook is not None:
        model_hook(probe.model)
    stats: dict[str, LayerStats] = {}
    handles = attach_stats(probe.model, stats)
    try:
        probe.run_batches(batches)
    finally:
        for h in handles:
            h.remove()
    layers = [s for s in stats.values() if s.act.count]
    if bf16_native is None:
        bf16_native = device_bf16_native(probe.device)
    if fp16_fast is None:
        fp16_fast = probe.device.type == "cuda"
    return judge(recipe, batches, layers, bf16_native, fp16_fast)
