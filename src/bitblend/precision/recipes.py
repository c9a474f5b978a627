"""The precision recipes by name: 32-true, bf16-mixed, 16-mixed, bf16-true, fp8, fp8-emulated
(and `auto`, resolved here). `build_precision` picks the class of the mode family:

- `32-true`: `FullPrecision` (full.py);
- `bf16-mixed`, `16-mixed` (GradScaler inside), `fp8`, `fp8-emulated`: `MixedPrecision`
  (mixed.py);
- `bf16-true` (fp32 masters, or stochastic / Kahan rounding without): `HalfPrecision`
  (half.py).

Callers type against the `Precision` protocol (base.py), never a class.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from pathlib import Path
from typing import cast

import torch

from bitblend.config.schema import PrecisionConfig, Recipe
from bitblend.errors import BitblendError
from bitblend.precision.base import Precision
from bitblend.precision.fp8 import check_fp8_hardware, convert_emulated, convert_torchao
from bitblend.precision.full import FullPrecision
from bitblend.precision.half import HalfPrecision
from bitblend.precision.mixed import MixedPrecision
from bitblend.precision.state_bits import StateBits, resolve_state_bits

log = logging.getLogger(__name__)

FP16_CPU_WARNING = (
    "16-mixed on a CPU: fp16 matmuls have no fast CPU kernels (measured ~400x slower than fp32 "
    "on this class of machine, 0.3-0.4 GFLOP/s). Use bf16-mixed (or auto) on CPU; keep 16-mixed "
    "for GPUs without bf16."
)

BF16_CPU_WARNING = (
    "{name} on a CPU without native bf16 (no AVX512-BF16 or AMX): its bf16 matmuls run on "
    "PyTorch's reference kernels, measured 8-50x slower than fp32 on an AVX2 machine "
    "(`bitblend estimate` prices it on this one). Keep it for its memory; for speed use "
    "precision.recipe auto (32-true here)."
)


def cpu_bf16_native() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
            return True
    except AttributeError:  # older torch: read the flags ourselves
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def slow_bf16_warning(name: str, device: torch.device, cpu_bf16: bool | None = None) -> str:
    """BF16_CPU_WARNING for training recipe `name` on `device`, or "" where it runs at speed.
    `auto` never picks bf16 on such a CPU, so this is a recipe that asked for it by name
    (the trainer warns; serving a bf16 run has its own `--precision fp32`)."""
    if name not in ("bf16-true", "bf16-mixed") or device.type != "cpu":
        return ""
    if cpu_bf16_native() if cpu_bf16 is None else cpu_bf16:
        return ""
    return BF16_CPU_WARNING.format(name=name)


def bf16_native(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: the CPU's flags, or CUDA's own answer."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return cpu_bf16_native()


def auto_recipe(device: torch.device) -> str:
    """The recipe `auto` stands for on `device` (resolve_auto on what it has)."""
    native = bf16_native(device)
    cuda = device.type == "cuda"
    return resolve_auto(device.type, native and not cuda, native and cuda)


def resolve_auto(device_type: str, cpu_bf16: bool, cuda_bf16: bool) -> str:
    """The recipe `auto` stands for: bf16-mixed where bf16 is native, else 32-true, never fp16."""
    if device_type == "cuda":
        return "bf16-mixed" if cuda_bf16 else "32-true"
    return "bf16-mixed" if cpu_bf16 else "32-true"


def with_state_bits(recipe: Recipe, device_type: str) -> Recipe:
    """`recipe` with `precision.state_bits` resolved for `device_type` (unchanged unless
    auto): what the optimizer, the estimate and recipe.yaml then see."""
    bits = resolve_state_bits(recipe.precision.state_bits, device_type)
    if bits == recipe.precision.state_bits:
        return recipe
    return replace(recipe, precision=replace(recipe.precision, state_bits=cast(StateBits, bits)))


def _check_combination(cfg: PrecisionConfig, name: str) -> None:
    """Reject settings that would silently do nothing, naming the field to change."""
    if cfg.rounding != "nearest" and not (name == "bf16-true" and not cfg.master_weights):
        raise BitblendError(
            f"precision.rounding {cfg.rounding}: applies to bf16-true with master_weights false "
            f"(recipe is {name}, master_weights {str(cfg.master_weights).lower()}); with fp32 "
            "weights or masters no update is rounded away"
        )


def build_precision(cfg: PrecisionConfig, device: torch.device, seed: int = 0) -> Precision:
    """The precision object for `cfg.recipe` on `device` (`auto` resolved to a concrete one);
    `seed` seeds stochastic rounding."""
    name: str = cfg.recipe
    if name == "auto":
        name = auto_recipe(device)
    _check_combination(cfg, name)
    if name == "32-true":
        return FullPrecision(device, cfg, cfg.recipe)
    if name == "bf16-mixed":
        return MixedPrecision(name, device, cfg, cfg.recipe, autocast_dtype=torch.bfloat16)
    if name == "16-mixed":
        if device.type == "cpu":
            warnings.warn(FP16_CPU_WARNING, stacklevel=2)
            log.warning(FP16_CPU_WARNING)
        scaler = torch.amp.GradScaler(
            device.type, init_scale=cfg.init_scale, growth_interval=cfg.growth_interval
        )
        return MixedPrecision(
            name, device, cfg, cfg.recipe, autocast_dtype=torch.float16, scaler=scaler
        )
    if name in ("fp8", "fp8-emulated"):
        if name == "fp8":
            check_fp8_hardware(device)
        swap = convert_torchao if name == "fp8" else convert_emulated
        # fp8 recipes run everything outside the converted Linear layers in bf16 autocast.
        return MixedPrecision(
            name, device, cfg, cfg.recipe, autocast_dtype=torch.bfloat16, fp8_swap=swap
        )
    if name == "bf16-true":
        return HalfPrecision(device, cfg, cfg.recipe, seed)
    raise BitblendError(f"precision.recipe: unknown recipe {name!r}")
