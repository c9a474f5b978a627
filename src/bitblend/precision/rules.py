"""Module rules: which modules compute in fp32 inside a low-precision recipe, and how.

Normalisation layers, task heads and `precision.keep_fp32` modules compute in fp32 with
autocast off; their weights stay fp32 whatever the recipe casts the rest to.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_NORM_SUFFIXES = ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d")


def is_norm(module: nn.Module) -> bool:
    """Normalisation layers, which lose accuracy in bf16 and stay fp32 in every recipe."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(_NORM_SUFFIXES)


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        return obj.to(dtype)
    if isinstance(obj, tuple):
        return tuple(_cast_floats(o, dtype) for o in obj)
    return obj


def run_in_fp32(module: nn.Module, device_type: str, out_dtype: torch.dtype | None) -> None:
    """Make `module` compute in fp32 with autocast off, casting its output to `out_dtype`.

    CPU autocast runs layer_norm in its input dtype (unlike CUDA, which lists it as fp32),
    so a bf16 recipe must do this itself. The module's own weights stay fp32.
    """
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=device_type, enabled=False):
            args = tuple(_cast_floats(a, torch.float32) for a in args)
            kwargs = {k: _cast_floats(v, torch.float32) for k, v in kwargs.items()}
            out = inner(*args, **kwargs)
        return out if out_dtype is None else _cast_floats(out, out_dtype)

    module.forward = forward
    module.float()


def keep_in_fp32(
    model: nn.Module, device_type: str, keep: Callable[[str], bool], weight_dtype: torch.dtype
) -> list[str]:
    """Cast `model` to `weight_dtype`, except heads, norms and `keep` modules, which compute
    in fp32; returns the names of those. Heads return fp32 logits for the loss; norms hand
    the trunk its compute dtype (bf16 under bf16-true, whatever autocast gives otherwise)."""
    heads = set(getattr(model, "fp32_module_names", ()))
    kept: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        nested = any(name.startswith(k + ".") for k, _ in kept)
        wanted = name in heads or is_norm(module) or (bool(name) and keep(name))
        if wanted and not nested:
            kept.append((name, module))
    model.to(weight_dtype)
    for name, module in kept:
        out = None if name in heads or weight_dtype == torch.float32 else weight_dtype
        run_in_fp32(module, device_type, out)
    return [name for name, _ in kept]
