"""Optimizers (the seed's GD / Adam / RMSprop / AdamW) and learning-rate schedules."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bitblend.config.schema import OptimizerConfig, ScheduleConfig
from bitblend.optim.lowbit import build_lowbit, stateless


@dataclass(frozen=True)
class ParamRole:
    """How the optimizer treats one trainable model parameter."""

    name: str  # the model's parameter name
    decay: bool  # weight decay applies: matrices, not biases or norm gains (BERT, HF Trainer)
    new: bool  # outside the pretrained trunk (heads, adapters): lr x optimizer.new_lr_scale


def _outside_trunk(name: str) -> bool:
    return not name.startswith("backbone.")


def param_roles(
    model: nn.Module, is_new: Callable[[str], bool] = _outside_trunk
) -> list[ParamRole]:
    """One role per trainable parameter, in `named_parameters` order, decided from the
    model's own tensors (name and shape). Call it before the precision makes optimizer
    copies: bf16-true's fp32 stand-ins are empty between steps, so their shape says nothing.
    `is_new(name)`: whether the parameter starts from scratch (trains at new_lr_scale);
    the multi-task model's own rule also counts a checkpoint's LM head as pretrained."""
    return [
        ParamRole(name, p.ndim >= 2, is_new(name))
        for name, p in model.named_parameters()
        if p.requires_grad
    ]


def _groups(
    params: list[nn.Parameter], roles: list[ParamRole], cfg: OptimizerConfig
) -> list[dict[str, Any]]:
    """Parameter groups by (new, decay): trunk decay, trunk no-decay, new decay, new no-decay."""
    groups = []
    for new in (False, True):
        lr = cfg.lr * cfg.new_lr_scale if new else cfg.lr
        for decay in (True, False):
            chosen = [
                p
                for p, r in zip(params, roles, strict=True)
                if r.decay == decay and (r.new and cfg.new_lr_scale != 1.0) == new
            ]
            if chosen:
                wd = cfg.weight_decay if decay else 0.0
                groups.append({"params": chosen, "weight_decay": wd, "lr": lr})
    return groups


def _fused_ok(params: list[nn.Parameter]) -> bool:
    # Fused Adam/AdamW kernels exist for CPU and CUDA floating tensors (torch >= 2.4) and
    # are the fastest step there; they need all parameters on one device type.
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= {"cpu", "cuda"}


def build_optimizer(
    params: list[nn.Parameter],
    cfg: OptimizerConfig,
    roles: list[ParamRole] | None = None,
    state_bits: int = 32,
) -> torch.optim.Optimizer:
    """The optimizer named by `cfg` over `params`. `roles[i]` (from `param_roles(model)`)
    says how to treat `params[i]`: decay or not, trunk lr or lr x `cfg.new_lr_scale`;
    without roles the params are the model's own tensors, grouped by their own shapes.
    `state_bits` 8 / 4 picks a quantised-state optimizer (16 is handled by the precision
    recipe, which stores states in bf16)."""
    if roles is None:
        if any(p.numel() == 0 for p in params):
            # Empty fp32 stand-ins (bf16-true, master_weights false) have no shape to go by.
            raise ValueError("empty optimizer parameters: pass param_roles(model) as roles")
        roles = [ParamRole(str(i), p.ndim >= 2, False) for i, p in enumerate(params)]
    if len(roles) != len(params):
        raise ValueError(f"{len(params)} optimizer parameters but {len(roles)} roles")
    groups = _groups(params, roles, cfg)
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
