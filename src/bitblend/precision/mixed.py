"""Mixed precision: fp32 weights, forward/backward under autocast.

`bf16-mixed` and `16-mixed` (with its GradScaler inside), and the fp8 recipes, which are
bf16-mixed with the trunk's Linear layers swapped for fp8 ones (`fp8`: torchao's
Float8Linear; `fp8-emulated`: an exact emulation that runs anywhere).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from bitblend.config.schema import PrecisionConfig
from bitblend.precision.base import StepResult, description
from bitblend.precision.base_weights import freeze_base
from bitblend.precision.fp8 import Fp8Swap, keep_matcher
from bitblend.precision.fsdp import fsdp_policies
from bitblend.precision.rules import keep_in_fp32
from bitblend.precision.update import Updater, trainable


class MixedPrecision:
    """Autocast to `autocast_dtype` over fp32 weights; norms and heads compute in fp32.
    Build it with `recipes.build_precision`."""

    def __init__(
        self,
        name: str,
        device: torch.device,
        cfg: PrecisionConfig,
        requested: str,
        *,
        autocast_dtype: torch.dtype,
        scaler: torch.amp.GradScaler | None = None,
        fp8_swap: Fp8Swap | None = None,
    ) -> None:
        self.name = name
        self.requested = requested
        self.device = device
        self.cfg = cfg
        self.autocast_dtype = autocast_dtype
        self.scaler = scaler  # 16-mixed: fp16's narrow range needs a loss scale
        self.fp8_swap = fp8_swap
        self.updater = Updater(cfg)
        self.fp32_modules: list[str] = []
        self.fp8_modules: list[str] = []
        self.transient_bytes = 0  # no copies made inside the step

    def convert_module(self, model: nn.Module) -> nn.Module:
        """Swap the trunk's Linear layers for fp8 ones (fp8 recipes); norms, heads and
        keep_fp32 modules compute in fp32; weights stay fp32."""
        model.to(self.device)
        keep = keep_matcher(model, self.cfg.keep_fp32)
        self.updater.attach(model)
        if self.fp8_swap is not None:
            self.fp8_modules = self.fp8_swap(model, self.cfg.fp8_scaling, keep)
        self.fp32_modules = keep_in_fp32(model, self.device.type, keep, torch.float32)
        freeze_base(model, self.cfg.base_bits)  # model.adapter: a low-bit frozen backbone
        return model

    def optimizer_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The trainable (fp32) parameters themselves."""
        named = trainable(model)
        params = [p for _, p in named]
        self.updater.bind(named, params)
        return params

    def forward_context(self) -> AbstractContextManager[Any]:
        """Autocast to the recipe's compute dtype."""
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss times the loss scale (16-mixed), else the loss."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def backward(self, loss: torch.Tensor) -> None:
        """Backward through the loss scale where there is one."""
        self.scale_loss(loss).backward()

    def optimizer_step(
        self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None
    ) -> StepResult:
        """Unscale (16-mixed), check and clip; step unless a gradient is non-finite."""
        scaler = self.scaler
        if scaler is None:
            check = self.updater.check_and_clip(max_grad_norm)
            if check.finite:
                self.updater.apply(optimizer, optimizer.step)
            return self.updater.finish(check, None)
        scaler.unscale_(optimizer)
        check = self.updater.check_and_clip(max_grad_norm)

        def step() -> None:
            # GradScaler.step skips by itself when unscale_ found inf/nan; update lowers
            # the scale then (and raises it after growth_interval clean steps).
            scaler.step(optimizer)
            scaler.update()

        self.updater.apply(optimizer, step)
        return self.updater.finish(check, float(scaler.get_scale()))

    def model_state_bytes(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Weights, gradients and optimizer states (autocast copies are transient)."""
        return self.updater.state_bytes(model, optimizer)

    def state_dict(self) -> dict[str, Any]:
        """The recipe name, step-health counter and loss-scaler state."""
        state = self.updater.state_dict(self.name)
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.updater.load_state_dict(state, self.name)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def fsdp_policies(self) -> tuple[Any, Any]:
        """FSDP2 MixedPrecisionPolicy of (blocks and root, fp32-kept modules); see fsdp.py."""
        return fsdp_policies(self.autocast_dtype, torch.float32)

    def describe(self) -> dict[str, Any]:
        """The recipe actually in use, for logs and summary.json."""
        return description(
            self.name,
            self.requested,
            self.device,
            compute=self.autocast_dtype,
            weights=torch.float32,
            state_bits=self.cfg.state_bits,
            loss_scaler=self.scaler is not None,
            fp32_modules=len(self.fp32_modules),
            fp8_modules=len(self.fp8_modules),
            base_bits=self.cfg.base_bits,
        )
