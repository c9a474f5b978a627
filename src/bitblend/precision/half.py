"""`bf16-true`: bf16 weights and bf16 arithmetic; norms and heads stay fp32.

The optimizer updates fp32 stand-ins for the bf16 weights. With `master_weights` they are
persistent fp32 masters (4 more bytes per weight), copied back to bf16 after each step.
Without, they exist only inside `optimizer_step` (rebuilt from the bf16 weight, plus its
Kahan compensation) and `rounding` says how the result is written back: to nearest,
stochastically (seeded generator), or with Kahan compensation (rounding.py).
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from bitblend.config.schema import PrecisionConfig
from bitblend.errors import BitblendError
from bitblend.precision.base import StepResult, description
from bitblend.precision.base_weights import freeze_base
from bitblend.precision.fp8 import keep_matcher
from bitblend.precision.fsdp import fsdp_policies
from bitblend.precision.rounding import kahan_round_, narrow_, widen
from bitblend.precision.rules import keep_in_fp32
from bitblend.precision.update import Updater, nbytes, trainable


class HalfPrecision:
    """The `bf16-true` recipe. Build it with `recipes.build_precision`."""

    def __init__(
        self, device: torch.device, cfg: PrecisionConfig, requested: str, seed: int = 0
    ) -> None:
        self.name = "bf16-true"
        self.requested = requested
        self.device = device
        self.cfg = cfg
        self.weight_dtype = torch.bfloat16
        self.master_weights = cfg.master_weights
        # Without a persistent master the fp32 copy exists only inside optimizer_step.
        self.transient = not self.master_weights
        self.rounding = cfg.rounding if self.transient else "nearest"
        self.updater = Updater(cfg)
        self.fp32_modules: list[str] = []
        # (bf16 model parameter, fp32 stand-in) pairs; fp32 parameters are not paired.
        self._pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        self._comp: list[torch.Tensor] = []  # Kahan compensation, one per pair
        self._gen: torch.Generator | None = None
        if self.rounding == "stochastic":
            self._gen = torch.Generator(device=device).manual_seed(seed)
        self.transient_bytes = 0  # fp32 copies alive only during the optimizer step

    # -- model -------------------------------------------------------------------------
    def convert_module(self, model: nn.Module) -> nn.Module:
        """Cast weights to bf16; norms, heads and keep_fp32 modules compute in fp32."""
        model.to(self.device)
        keep = keep_matcher(model, self.cfg.keep_fp32)
        self.updater.attach(model)
        self.fp32_modules = keep_in_fp32(model, self.device.type, keep, self.weight_dtype)
        freeze_base(model, self.cfg.base_bits)  # model.adapter: a low-bit frozen backbone
        return model

    def optimizer_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """fp32 parameters themselves, fp32 stand-ins for the bf16 ones."""
        named = trainable(model)
        self._pairs = []
        self._comp = []
        out: list[nn.Parameter] = []
        for _, p in named:
            if p.dtype == torch.float32:
                out.append(p)  # norms, heads: updated directly
                continue
            # A transient stand-in holds no memory between steps; optimizer_step fills it.
            data = torch.empty(0, device=p.device) if self.transient else p.detach().float()
            master = nn.Parameter(data.clone())
            self._pairs.append((p, master))
            if self.rounding == "kahan":
                self._comp.append(torch.zeros_like(p))
            out.append(master)
        self.updater.bind(named, out)
        return out

    # -- step --------------------------------------------------------------------------
    def forward_context(self) -> AbstractContextManager[Any]:
        """Nothing: the weights are bf16 already, no autocast."""
        return contextlib.nullcontext()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss itself (bf16 has fp32's range: no loss scale)."""
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        """Plain backward."""
        loss.backward()

    def optimizer_step(
        self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None
    ) -> StepResult:
        """Move gradients to the fp32 stand-ins, check, clip, step unless a gradient is
        non-finite, and write the result back into the bf16 weights."""
        self._widen()
        check = self.updater.check_and_clip(max_grad_norm)
        if check.finite:
            self.updater.apply(optimizer, optimizer.step)
        self._narrow(check.finite)
        return self.updater.finish(check, None)

    def _widen(self) -> None:
        """Give every stand-in its fp32 value (transient ones are rebuilt) and fp32 gradient."""
        self.transient_bytes = 0
        for i, (p, master) in enumerate(self._pairs):
            if self.transient:
                comp = self._comp[i] if self._comp else None
                master.data = widen(p, comp)
                self.transient_bytes += 2 * nbytes(master.data)
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    def _narrow(self, stepped: bool) -> None:
        """Write stand-ins back into the bf16 weights; free transient ones."""
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

    def model_state_bytes(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Weights, gradients, masters, compensation and optimizer states at rest."""
        masters = 0 if self.transient else sum(nbytes(m) for _, m in self._pairs)
        comp = sum(nbytes(c) for c in self._comp)
        return self.updater.state_bytes(model, optimizer) + masters + comp

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """fp32 masters or Kahan buffers, rounding RNG, step-health counter."""
        state = self.updater.state_dict(self.name)
        if self._pairs and not self.transient:
            state["masters"] = [m.detach() for _, m in self._pairs]
        if self._comp:
            state["kahan"] = [c.detach() for c in self._comp]
        if self._gen is not None:
            state["rounding_rng"] = self._gen.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (masters also overwrite the bf16 weights)."""
        self.updater.load_state_dict(state, self.name)
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

    def fsdp_policies(self) -> tuple[Any, Any]:
        """FSDP2 MixedPrecisionPolicy of (blocks and root, fp32-kept modules); see fsdp.py."""
        return fsdp_policies(None, self.weight_dtype)

    def describe(self) -> dict[str, Any]:
        """The recipe actually in use, for logs and summary.json."""
        return description(
            self.name,
            self.requested,
            self.device,
            compute=self.weight_dtype,
            weights=self.weight_dtype,
            state_bits=self.cfg.state_bits,
            master_weights=self.master_weights,
            rounding=self.rounding,
            fp32_modules=len(self.fp32_modules),
            base_bits=self.cfg.base_bits,
        )
