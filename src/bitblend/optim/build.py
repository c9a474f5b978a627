"""Optimizers (the seed's GD / Adam / RMSprop / AdamW) and learning-rate schedules."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from bitblend.config.schema import OptimizerConfig, ScheduleConfig
from bitblend.optim.lowbit import build_lowbit, stateless


def _decay_groups(
    params: list[nn.Parameter], weight_decay: float, lr: float
) -> list[dict[str, Any]]:
    # Biases and norm gains (1-d tensors) get no weight decay, as in BERT and HF Trainer.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr}] if decay else []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr": lr})
    return groups


def _fused_ok(params: list[nn.Parameter]) -> bool:
    # Fused Adam/AdamW kernels exist for CPU and CUDA floating tensors (torch >= 2.4) and
    # are the fastest step there; they need all parameters on one device type.
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= {"cpu", "cuda"}


def build_optimizer(
    params: list[nn.Parameter],
    cfg: OptimizerConfig,
    new: set[int] | None = None,
    state_bits: int = 32,
) -> torch.optim.Optimizer:
    """The optimizer named by `cfg` over `params`; those whose id is in `new` (heads,
    adapters) get lr x `cfg.new_lr_scale`. `state_bits` 8 / 4 picks a quantised-state
    optimizer (16 is handled by the precision recipe, which stores states in bf16)."""
    new = new or set()
    trunk = [p for p in params if id(p) not in new]
    fresh = [p for p in params if id(p) in new]
    if cfg.new_lr_scale == 1.0:
        trunk, fresh = params, []
    groups = _decay_groups(trunk, cfg.weight_decay, cfg.lr)
    groups += _decay_groups(fresh, cfg.weight_decay, cfg.lr * cfg.new_lr_scale)
    if state_bits < 32 and stateless(cfg):
        warnings.warn(
            f"precision.state_bits {state_bits}: plain gradient descent (sgd, momentum 0) keeps "
            "no optimizer state; nothing to narrow",
            stacklevel=2,
        )
    elif state_bits in (8, 4):
        return build_lowbit(groups, cfg, state_bits)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=True
        )
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(
            groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum, foreach=True
        )
    betas = (cfg.betas[0], cfg.betas[1])
    fused = _fused_ok(params)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def lr_factor(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Multiplier on the peak lr after `step` taken steps, out of `total`."""
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total)
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if cfg.name == "linear":
        decay = 1.0 - progress
    elif cfg.name == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {cfg.name!r}")
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def build_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: ScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `lr_factor`; the trainer steps it only on taken steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))
