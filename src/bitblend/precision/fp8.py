"""fp8 training: torchao's Float8Linear on capable GPUs, and an exact CPU emulation.

`fp8-emulated` answers "does this model train in fp8?" on any machine before renting a GPU:
every converted Linear quantises its input and weight to e4m3 in forward and the incoming
gradient to e5m2 in backward, with per-tensor or per-row scales, and multiplies the
dequantised values. Rounding and saturation are what an fp8 GEMM sees; only speed differs.

Saturation is done by an explicit clamp: torch's e4m3fn cast saturates to 448 even for inf,
which would hide overflow instead of reporting it, and e5m2's cast turns large values into inf.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn

from bitblend.errors import BitblendError

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
E5M2_MAX = float(torch.finfo(E5M2).max)  # 57344
_EPS = 1e-12

Scaling = Literal["tensorwise", "rowwise"]
# How an fp8 recipe swaps the trunk's Linear layers: (model, scaling, keep rule) -> names.
Fp8Swap = Callable[[nn.Module, Scaling, Callable[[str], bool]], list[str]]


def quantize_dequantize(x: torch.Tensor, fp8: torch.dtype, scaling: Scaling) -> torch.Tensor:
    """`x` rounded through `fp8` with amax scaling (per tensor, or per row = last dim)."""
    fmax = float(torch.finfo(fp8).max)
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if scaling == "rowwise" else xf.abs().amax()
    # Scale so the largest magnitude lands on the format's max (as torchao's dynamic scaling).
    scale = fmax / amax.clamp(min=_EPS)
    q = (xf * scale).clamp(-fmax, fmax).to(fp8)
    return (q.float() / scale).to(x.dtype)


class _Fp8LinearFn(torch.autograd.Function):
    """y = x W^T + b with x, W through e4m3 and dL/dy through e5m2."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        scaling: Scaling,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        xq = quantize_dequantize(x.to(dtype), E4M3, scaling)
        # Row-wise weight scales are per output channel (rows of W, shape out x in).
        wq = quantize_dequantize(weight.to(dtype), E4M3, scaling)
        ctx.save_for_backward(xq, wq)
        ctx.has_bias = bias is not None
        ctx.scaling = scaling
        ctx.shapes = (x.dtype, weight.dtype)
        out = xq @ wq.t()
        if bias is not None:
            out = out + bias.to(dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        xq, wq = ctx.saved_tensors
        x_dtype, w_dtype = ctx.shapes
        gq = quantize_dequantize(grad.to(xq.dtype), E5M2, ctx.scaling)
        grad_x = (gq @ wq).to(x_dtype)
        g2 = gq.reshape(-1, gq.shape[-1])  # (tokens, out)
        grad_w = (g2.t() @ xq.reshape(-1, xq.shape[-1])).to(w_dtype)  # (out, in)
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0).to(w_dtype) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None


class Fp8EmulatedLinear(nn.Linear):
    """An nn.Linear whose matmuls see fp8 rounding; weights and state_dict are unchanged."""

    fp8_scaling: Scaling = "tensorwise"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantise-dequantise x and W to e4m3 (grads to e5m2) around the matmul."""
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
        else:
            dtype = torch.promote_types(x.dtype, self.weight.dtype)
        with torch.autocast(device_type=device, enabled=False):
            out: torch.Tensor = _Fp8LinearFn.apply(
                x, self.weight, self.bias, self.fp8_scaling, dtype
            )
        return out


def convertible_linears(
    model: nn.Module, keep: Callable[[str], bool]
) -> list[tuple[str, nn.Linear]]:
    """The trunk's Linear layers that fp8 may take: not heads, adapters or kept modules.

    Only modules under `backbone.` qualify: task heads (the last layers) and modality
    adapters / embeddings (the first layers) stay in higher precision, as torchao and
    the fp8 training literature recommend.
    """
    out = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.startswith("backbone.") and not keep(name):
            out.append((name, module))
    return out


def convert_emulated(model: nn.Module, scaling: Scaling, keep: Callable[[str], bool]) -> list[str]:
    """Turn the trunk's Linear layers into Fp8EmulatedLinear in place; returns their names."""
    names = []
    for name, module in convertible_linears(model, keep):
        module.__class__ = Fp8EmulatedLinear
        setattr(module, "fp8_scaling", scaling)  # noqa: B010  (class swapped just above)
        names.append(name)
    return names


def check_fp8_hardware(device: torch.device) -> None:
    """Raise the one-line error naming `fp8-emulated` unless an fp8-capable GPU is here."""
    if device.type != "cuda":
        raise BitblendError(
            f"precision.recipe fp8: needs a CUDA GPU with compute capability >= 8.9 (this run is "
            f"on {device.type}); use precision.recipe fp8-emulated to check fp8 training here"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise BitblendError(
            f"precision.recipe fp8: this GPU has compute capability {major}.{minor}, fp8 "
            "matmuls need >= 8.9 (Ada, Hopper, Blackwell); use bf16-mixed, or fp8-emulated"
        )


def convert_torchao(model: nn.Module, scaling: Scaling, keep: Callable[[str], bool]) -> list[str]:
    """Swap the trunk's Linear layers for torchao Float8Linear (real fp8 GEMMs on CUDA)."""
    from bitblend.optim.lowbit import quiet_import

    float8 = quiet_import("torchao.float8", "lowbit", "precision.recipe fp8")
    Float8LinearConfig, convert_to_float8_training = (
        float8.Float8LinearConfig,
        float8.convert_to_float8_training,
    )
    chosen = {name for name, m in convertible_linears(model, keep) if _fp8_shape_ok(m)}
    config = Float8LinearConfig.from_recipe_name(scaling)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn in chosen)
    return sorted(chosen)


def _fp8_shape_ok(m: nn.Linear) -> bool:
    # torch._scaled_mm needs both GEMM dimensions divisible by 16.
    return m.in_features % 16 == 0 and m.out_features % 16 == 0


def keep_matcher(model: nn.Module, patterns: Iterable[str]) -> Callable[[str], bool]:
    """A predicate over module names for `precision.keep_fp32`; a pattern matching nothing
    is an error naming its index (a typo would otherwise silently keep nothing)."""
    pats = list(patterns)
    names = [n for n, _ in model.named_modules() if n]
    for i, pat in enumerate(pats):
        if not any(_match(n, pat) for n in names):
            example = next((n for n in names if n.count(".") >= 3), names[0] if names else "")
            raise BitblendError(
                f"precision.keep_fp32[{i}] {pat!r}: matches no module; names look like {example!r}"
                " (glob patterns allowed)"
            )
    return lambda name: any(_match(name, p) for p in pats)


def _match(name: str, pattern: str) -> bool:
    # A pattern naming a module also covers everything inside it.
    return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern.rstrip("*.") + ".")
