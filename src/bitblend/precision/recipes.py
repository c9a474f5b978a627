"""The precision recipes: 32-true, bf16-mixed, 16-mixed, bf16-true (and `auto`, resolved here).

This is the only module that names dtypes. One class covers every recipe by composition of
three choices: the autocast dtype (None = no autocast), the weight dtype, and whether a loss
scaler / fp32 master copy exists.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitblend.config.schema import PrecisionConfig
from bitblend.errors import BitblendError
from bitblend.precision.base import StepResult

log = logging.getLogger(__name__)

FP16_CPU_WARNING = (
    "16-mixed on a CPU: fp16 matmuls have no fast CPU kernels (measured ~400x slower than fp32 "
    "on this class of machine, 0.3-0.4 GFLOP/s). Use bf16-mixed (or auto) on CPU; keep 16-mixed "
    "for GPUs without bf16."
)

_NORM_SUFFIXES = ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d")


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


def resolve_auto(device_type: str, cpu_bf16: bool, cuda_bf16: bool) -> str:
    """The recipe `auto` stands for: bf16-mixed where bf16 is native, else 32-true, never fp16."""
    if device_type == "cuda":
        return "bf16-mixed" if cuda_bf16 else "32-true"
    return "bf16-mixed" if cpu_bf16 else "32-true"


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


class PrecisionRecipe:
    """One precision recipe; see the module docstring. Build it with `build_precision`."""

    def __init__(
        self,
        name: str,
        device: torch.device,
        *,
        autocast_dtype: torch.dtype | None,
        weight_dtype: torch.dtype,
        scaler: torch.amp.GradScaler | None = None,
        master_weights: bool = False,
        requested: str | None = None,
    ) -> None:
        self.name = name
        self.requested = requested or name
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.weight_dtype = weight_dtype
        self.scaler = scaler
        self.master_weights = master_weights and weight_dtype != torch.float32
        self.fp32_modules: list[str] = []
        # (low-precision model parameter, fp32 master) pairs; empty unless master_weights.
        self._pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        self._params: list[nn.Parameter] = []

    # -- model -------------------------------------------------------------------------
    def convert_module(self, model: nn.Module) -> nn.Module:
        """Cast weights to the recipe's dtype; norms and task heads stay fp32."""
        model.to(self.device)
        if self.autocast_dtype is None and self.weight_dtype == torch.float32:
            return model  # 32-true: nothing to do
        heads = set(getattr(model, "fp32_module_names", ()))
        keep: list[tuple[str, nn.Module]] = []
        for name, module in model.named_modules():
            nested = any(name.startswith(k + ".") for k, _ in keep)
            if (name in heads or is_norm(module)) and not nested:
                keep.append((name, module))
        model.to(self.weight_dtype)
        for name, module in keep:
            is_head = name in heads
            # Heads return fp32 logits for the loss; norms hand the trunk its compute dtype.
            out = None if is_head or self.weight_dtype == torch.float32 else self.weight_dtype
            run_in_fp32(module, self.device.type, out)
            self.fp32_modules.append(name)
        return model

    def optimizer_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Trainable parameters, or their fp32 masters when the recipe keeps a master copy."""
        params = [p for p in model.parameters() if p.requires_grad]
        if not self.master_weights:
            self._params = params
            return params
        self._pairs = []
        masters: list[nn.Parameter] = []
        for p in params:
            if p.dtype == torch.float32:
                masters.append(p)  # already fp32 (norms, heads): the optimizer owns it directly
                continue
            master = nn.Parameter(p.detach().clone().float())
            self._pairs.append((p, master))
            masters.append(master)
        self._params = masters
        return masters

    # -- step --------------------------------------------------------------------------
    def forward_context(self) -> AbstractContextManager[Any]:
        """Autocast for mixed recipes, nothing otherwise."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss multiplied by the loss scale (16-mixed), for custom backward passes."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def backward(self, loss: torch.Tensor) -> None:
        """Backward, through the loss scaler when there is one."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def optimizer_step(
        self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None
    ) -> StepResult:
        """Unscale, move grads to masters, clip, and step unless a gradient is non-finite."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        for p, master in self._pairs:
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        # clip_grad_norm_ with an infinite max_norm measures the norm without changing grads.
        limit = float("inf") if max_grad_norm is None else max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self._params, limit, foreach=True)
        grad_norm = float(norm)  # the one host sync per step: needed to decide skipping
        finite = bool(torch.isfinite(norm))
        if self.scaler is not None:
            # GradScaler.step skips by itself when unscale_ found inf/nan; update lowers the scale.
            self.scaler.step(optimizer)
            self.scaler.update()
            scale: float | None = float(self.scaler.get_scale())
        else:
            if finite:
                optimizer.step()
            scale = None
        if finite:
            with torch.no_grad():
                for p, master in self._pairs:
                    p.copy_(master)
        return StepResult(stepped=finite, grad_norm=grad_norm, loss_scale=scale)

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Loss-scaler state and fp32 master weights (the model holds only rounded copies)."""
        state: dict[str, Any] = {"name": self.name}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self._pairs:
            state["masters"] = [m.detach() for _, m in self._pairs]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore scaler and master weights saved by `state_dict`."""
        if state.get("name") != self.name:
            raise BitblendError(
                f"checkpoint was written with precision {state.get('name')!r}, "
                f"the recipe asks for {self.name!r}"
            )
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        masters = state.get("masters", [])
        if len(masters) != len(self._pairs):
            raise BitblendError("checkpoint master weights do not match the model")
        with torch.no_grad():
            for (p, master), saved in zip(self._pairs, masters, strict=True):
                master.copy_(saved)
                p.copy_(saved)

    def describe(self) -> dict[str, Any]:
        """The recipe actually in use, for logs and summary.json."""
        return {
            "recipe": self.name,
            "requested": self.requested,
            "device": str(self.device),
            "compute_dtype": str(self.autocast_dtype or self.weight_dtype).replace("torch.", ""),
            "weight_dtype": str(self.weight_dtype).replace("torch.", ""),
            "master_weights": bool(self._pairs) or self.master_weights,
            "loss_scaler": self.scaler is not None,
            "fp32_modules": len(self.fp32_modules),
        }

    def iter_rules(self) -> Iterator[str]:
        """Names of modules kept in fp32."""
        yield from self.fp32_modules


def build_precision(cfg: PrecisionConfig, device: torch.device) -> PrecisionRecipe:
    """The precision object for `cfg.recipe` on `device` (`auto` resolved to a concrete one)."""
    name: str = cfg.recipe
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        name = resolve_auto(device.type, cpu_bf16_native(), cuda_bf16)
    if name == "32-true":
        return PrecisionRecipe(
            name, device, autocast_dtype=None, weight_dtype=torch.float32, requested=cfg.recipe
        )
    if name == "bf16-mixed":
        return PrecisionRecipe(
            name,
            device,
            autocast_dtype=torch.bfloat16,
            weight_dtype=torch.float32,
            requested=cfg.recipe,
        )
    if name == "16-mixed":
        if device.type == "cpu":
            warnings.warn(FP16_CPU_WARNING, stacklevel=2)
            log.warning(FP16_CPU_WARNING)
        scaler = torch.amp.GradScaler(
            device.type, init_scale=cfg.init_scale, growth_interval=cfg.growth_interval
        )
        return PrecisionRecipe(
            name,
            device,
            autocast_dtype=torch.float16,
            weight_dtype=torch.float32,
            scaler=scaler,
            requested=cfg.recipe,
        )
    if name == "bf16-true":
        return PrecisionRecipe(
            name,
            device,
            autocast_dtype=None,
            weight_dtype=torch.bfloat16,
            master_weights=cfg.master_weights,
            requested=cfg.recipe,
        )
    raise BitblendError(f"precision.recipe: unknown recipe {name!r}")
