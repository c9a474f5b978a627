"""`32-true`: fp32 weights, fp32 arithmetic; the optimizer updates the weights themselves."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from bitblend.config.schema import PrecisionConfig
from bitblend.precision.base import StepResult, description
from bitblend.precision.base_weights import freeze_base
from bitblend.precision.fp8 import keep_matcher
from bitblend.precision.fsdp import fsdp_policies
from bitblend.precision.update import Updater, trainable


class FullPrecision:
    """The `32-true` recipe. Build it with `recipes.build_precision`."""

    def __init__(self, device: torch.device, cfg: PrecisionConfig, requested: str) -> None:
        self.name = "32-true"
        self.requested = requested
        self.device = device
        self.cfg = cfg
        self.updater = Updater(cfg)
        self.transient_bytes = 0  # no copies made inside the step

    def convert_module(self, model: nn.Module) -> nn.Module:
        """Move the model to the device in fp32; module rules have nothing to do here."""
        model.to(self.device, torch.float32)  # a no-op for the fp32 models bitblend builds
        keep_matcher(model, self.cfg.keep_fp32)  # a keep_fp32 typo is an error in every recipe
        self.updater.attach(model)
        freeze_base(model, self.cfg.base_bits)  # model.adapter: a low-bit frozen backbone
        return model

    def optimizer_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The trainable parameters themselves."""
        named = trainable(model)
        params = [p for _, p in named]
        self.updater.bind(named, params)
        return params

    def forward_context(self) -> AbstractContextManager[Any]:
        """Nothing: fp32 needs no autocast."""
        return contextlib.nullcontext()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss itself (no loss scale)."""
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        """Plain backward."""
        loss.backward()

    def optimizer_step(
        self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None
    ) -> StepResult:
        """Check and clip the gradients; step unless one is non-finite."""
        check = self.updater.check_and_clip(max_grad_norm)
        if check.finite:
            self.updater.apply(optimizer, optimizer.step)
        return self.updater.finish(check, None)

    def model_state_bytes(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Weights, gradients and optimizer states."""
        return self.updater.state_bytes(model, optimizer)

    def state_dict(self) -> dict[str, Any]:
        """The recipe name and the step-health counter."""
        return self.updater.state_dict(self.name)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.updater.load_state_dict(state, self.name)

    def fsdp_policies(self) -> tuple[Any, Any]:
        """FSDP2 MixedPrecisionPolicy of (blocks and root, fp32-kept modules); see fsdp.py."""
        return fsdp_policies(None, torch.float32)

    def describe(self) -> dict[str, Any]:
        """The recipe actually in use, for logs and summary.json."""
        return description(
            self.name,
            self.requested,
            self.device,
            compute=torch.float32,
            weights=torch.float32,
            state_bits=self.cfg.state_bits,
            base_bits=self.cfg.base_bits,
        )
