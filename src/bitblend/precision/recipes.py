"""The precision recipes: 32-true, bf16-mixed, 16-mixed, bf16-true (and `auto`, resolved here).

This is the only module that names dtypes. One class covers every recipe by composition of
three choices: the autocast dtype (None = no autocast), the weight dtype, and whether a loss
scaler / fp32 master copy exists.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitblend.config.schema import PrecisionConfig
from bitblend.errors import BitblendError
from bitblend.optim.lowbit import state_bytes
from bitblend.precision.base import StepResult
from bitblend.precision.fp8 import (
    check_fp8_hardware,
    convert_emulated,
    convert_torchao,
    keep_matcher,
)
from bitblend.precision.health import StepHealth
from bitblend.precision.rounding import kahan_round_, narrow_, widen

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
        cfg: PrecisionConfig | None = None,
        seed: int = 0,
    ) -> None:
        cfg = cfg or PrecisionConfig()
        self.name = name
        self.requested = requested or name
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.weight_dtype = weight_dtype
        self.scaler = scaler
        self.cfg = cfg
        low = weight_dtype != torch.float32
        self.master_weights = master_weights and low
        # Low-precision weights without a persistent master are updated through an fp32 copy
        # that exists only inside optimizer_step; `rounding` says how it is written back.
        self.transient = low and not self.master_weights
        self.rounding = cfg.rounding if self.transient else "nearest"
        self.state_bits = cfg.state_bits
        self.fp32_modules: list[str] = []
        self.fp8_modules: list[str] = []
        # (low-precision model parameter, fp32 master) pairs; empty for fp32 weights.
        self._pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        self._params: list[nn.Parameter] = []
        self._names: list[str] = []  # model parameter name of each optimizer parameter
        self._comp: list[torch.Tensor] = []  # Kahan compensation, one per pair
        self._gen: torch.Generator | None = None
        if self.rounding == "stochastic":
            self._gen = torch.Generator(device=device).manual_seed(seed)
        self.health = StepHealth(cfg.min_loss_scale, cfg.stuck_steps)
        self.last_nonfinite: str | None = None
        self.grad_bytes = 0  # bytes of the gradients of all trainable weights
        self.transient_bytes = 0  # fp32 copies alive only during the optimizer step

    # -- model -------------------------------------------------------------------------
    def convert_module(self, model: nn.Module) -> nn.Module:
        """Cast weights to the recipe's dtype; norms, heads and keep_fp32 modules stay fp32;
        fp8 recipes swap the trunk's Linear layers."""
        model.to(self.device)
        keep_rule = keep_matcher(model, self.cfg.keep_fp32)
        self.health.attach(model)
        if self.name == "fp8-emulated":
            self.fp8_modules = convert_emulated(model, self.cfg.fp8_scaling, keep_rule)
        elif self.name == "fp8":
            self.fp8_modules = convert_torchao(model, self.cfg.fp8_scaling, keep_rule)
        if self.autocast_dtype is None and self.weight_dtype == torch.float32:
            return model  # 32-true: nothing to do
        heads = set(getattr(model, "fp32_module_names", ()))
        keep: list[tuple[str, nn.Module]] = []
        for name, module in model.named_modules():
            nested = any(name.startswith(k + ".") for k, _ in keep)
            wanted = name in heads or is_norm(module) or (bool(name) and keep_rule(name))
            if wanted and not nested:
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
        """Trainable parameters, or fp32 masters standing in for low-precision ones."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        self._pairs = []
        self._comp = []
        out: list[nn.Parameter] = []
        for _, p in named:
            if p.dtype == torch.float32:
                out.append(p)  # fp32 already (norms, heads, mixed recipes): updated directly
                continue
            # A transient master holds no memory between steps; optimizer_step fills it.
            data = torch.empty(0, device=p.device) if self.transient else p.detach().float()
            master = nn.Parameter(data.clone())
            self._pairs.append((p, master))
            if self.rounding == "kahan":
                self._comp.append(torch.zeros_like(p))
            out.append(master)
        self._params = out
        # autograd gives each weight a gradient of its own dtype: bytes after a full backward.
        self.grad_bytes = sum(_nbytes(p) for _, p in named)
        return out

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
        self._widen()
        grads = [p.grad for p in self._params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        # FSDP2: a replicated DTensor over the shards' norms; clipping takes it as it is.
        whole = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        grad_norm = float(whole)  # the one host sync per step: needed to decide skipping
        finite = math.isfinite(grad_norm)
        # Attribute before clipping: clipping by an inf norm turns every gradient into nan.
        self.last_nonfinite = None if finite else self._attribute()
        if finite and max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self._params, max_grad_norm, norm, foreach=True)
        if self.state_bits == 16:
            _states_to(optimizer, torch.float32, None)
        if self.scaler is not None:
            # GradScaler.step skips by itself when unscale_ found inf/nan; update lowers the scale.
            self.scaler.step(optimizer)
            self.scaler.update()
            scale: float | None = float(self.scaler.get_scale())
        else:
            if finite:
                optimizer.step()
            scale = None
        if self.state_bits == 16:
            _states_to(optimizer, torch.bfloat16, None)
        self._narrow(finite)
        self.health.reset()
        self.health.check_scale(scale)
        return StepResult(stepped=finite, grad_norm=grad_norm, loss_scale=scale)

    def _widen(self) -> None:
        """Give every master its fp32 value (transient ones are rebuilt) and fp32 gradient."""
        self.transient_bytes = 0
        for i, (p, master) in enumerate(self._pairs):
            if self.transient:
                comp = self._comp[i] if self._comp else None
                master.data = widen(p, comp)
                self.transient_bytes += 2 * _nbytes(master.data)
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    def _narrow(self, stepped: bool) -> None:
        """Write masters back into the low-precision weights; free transient masters."""
        with torch.no_grad():
            for i, (p, master) in enumerate(self._pairs):
                if stepped:
                    if self.rounding == "kahan":
                        kahan_round_(p, self._comp[i], master)
                    else:
                        narrow_(p, master, self._gen)
                if self.transient:
                    master.data = torch.empty(0, device=p.device)
                    master.grad = None

    def _attribute(self) -> str | None:
        """The module where a non-finite gradient first appeared in backward order."""
        grads = {n: q.grad for n, q in zip(self._names, self._params, strict=True)}
        return self.health.first_nonfinite(grads)  # the trainer logs it with the step

    def model_state_bytes(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Bytes of model state at rest: weights, gradients, masters, compensation, states."""
        weights = sum(_nbytes(p) for p in model.parameters())
        masters = sum(_nbytes(m) for _, m in self._pairs) if not self.transient else 0
        comp = sum(_nbytes(c) for c in self._comp)
        return weights + self.grad_bytes + masters + comp + state_bytes(optimizer)

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Loss-scaler state, fp32 masters or Kahan buffers, rounding RNG, health counter."""
        state: dict[str, Any] = {"name": self.name, "health": self.health.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self._pairs and not self.transient:
            state["masters"] = [m.detach() for _, m in self._pairs]
        if self._comp:
            state["kahan"] = [c.detach() for c in self._comp]
        if self._gen is not None:
            state["rounding_rng"] = self._gen.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        if state.get("name") != self.name:
            raise BitblendError(
                f"checkpoint was written with precision {state.get('name')!r}, "
                f"the recipe asks for {self.name!r}"
            )
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.health.load_state_dict(state.get("health", {}))
        masters = state.get("masters", [])
        expected = 0 if self.transient else len(self._pairs)
        if len(masters) != expected or len(state.get("kahan", [])) != len(self._comp):
            raise BitblendError("checkpoint master weights do not match the model")
        with torch.no_grad():
            for (p, master), saved in zip(self._pairs, masters, strict=False):
                master.copy_(saved)
                p.copy_(saved)
            for comp, saved in zip(self._comp, state.get("kahan", []), strict=True):
                comp.copy_(saved)
        if self._gen is not None and "rounding_rng" in state:
            self._gen.set_state(state["rounding_rng"])

    def describe(self) -> dict[str, Any]:
        """The recipe actually in use, for logs and summary.json."""
        return {
            "recipe": self.name,
            "requested": self.requested,
            "device": str(self.device),
            "compute_dtype": str(self.autocast_dtype or self.weight_dtype).replace("torch.", ""),
            "weight_dtype": str(self.weight_dtype).replace("torch.", ""),
            "master_weights": self.master_weights,
            "rounding": self.rounding,
            "state_bits": self.state_bits,
            "loss_scaler": self.scaler is not None,
            "fp32_modules": len(self.fp32_modules),
            "fp8_modules": len(self.fp8_modules),
        }

    def fsdp_policies(self) -> tuple[Any, Any]:
        """FSDP2 MixedPrecisionPolicy of (blocks and root, fp32-kept modules); see fsdp.py."""
        from bitblend.precision.fsdp import fsdp_policies

        return fsdp_policies(self.autocast_dtype, self.weight_dtype)

    def iter_rules(self) -> Iterator[str]:
        """Names of modules kept in fp32."""
        yield from self.fp32_modules


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _states_to(optimizer: torch.optim.Optimizer, dtype: torch.dtype, _: Any) -> None:
    """Cast every full-size floating optimizer state (moments, momentum) to `dtype`.

    state_bits 16 stores states in bf16 between steps and widens them for the update, so
    any torch optimizer (fused kernels included, which need states in the param dtype) works.
    """
    for p, per_param in optimizer.state.items():
        for key, value in per_param.items():
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and value.shape == p.shape
                and value.numel() > 1
                and value.dtype != dtype
            ):
                per_param[key] = value.to(dtype)


def _check_combination(cfg: PrecisionConfig, name: str) -> None:
    """Reject settings that would silently do nothing, naming the field to change."""
    if cfg.rounding != "nearest" and not (name == "bf16-true" and not cfg.master_weights):
        raise BitblendError(
            f"precision.rounding {cfg.rounding}: applies to bf16-true with master_weights false "
            f"(recipe is {name}, master_weights {str(cfg.master_weights).lower()}); with fp32 "
            "weights or masters no update is rounded away"
        )


def build_precision(cfg: PrecisionConfig, device: torch.device, seed: int = 0) -> PrecisionRecipe:
    """The precision object for `cfg.recipe` on `device` (`auto` resolved to a concrete one)."""
    name: str = cfg.recipe
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        name = resolve_auto(device.type, cpu_bf16_native(), cuda_bf16)
    _check_combination(cfg, name)
    common: dict[str, Any] = {"requested": cfg.recipe, "cfg": cfg, "seed": seed}
    if name == "32-true":
        return PrecisionRecipe(
            name, device, autocast_dtype=None, weight_dtype=torch.float32, **common
        )
    if name in ("bf16-mixed", "fp8-emulated", "fp8"):
        if name == "fp8":
            check_fp8_hardware(device)
        # fp8 recipes run everything outside the converted Linear layers in bf16 autocast.
        return PrecisionRecipe(
            name, device, autocast_dtype=torch.bfloat16, weight_dtype=torch.float32, **common
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
            **common,
        )
    if name == "bf16-true":
        return PrecisionRecipe(
            name,
            device,
            autocast_dtype=None,
            weight_dtype=torch.bfloat16,
            master_weights=cfg.master_weights,
            **common,
        )
    raise BitblendError(f"precision.recipe: unknown recipe {name!r}")
