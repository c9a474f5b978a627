"""`model.compile`: torch.compile (inductor) of the backbone's transformer blocks.

Why: a Llama block's work outside its matmuls and attention is a chain of memory-bound
elementwise ops: RMSNorm (upcast to fp32, square, mean, rsqrt, scale, cast back), RoPE's
rotate-half (slice, negate, concatenate, two multiplies, an add, for q and for k), SwiGLU's
SiLU and product, the residual adds, and autocast's casts of every block input. Eager
PyTorch runs each as its own pass over memory, and on a CPU those passes took most of a
llama-30m step (docs/benchmarks.md, "Llama pre-training"). Inductor fuses each chain into
one vectorised C++ loop and keeps the matmuls and SDPA as the aten kernels they were.

Compiling per block (torchtitan's regional compilation) instead of the whole model gives
one graph that every layer reuses (same code, same shapes; parameters are graph inputs),
so the compile cost is paid once, not once per layer, and a graph break stays inside one
block. Where it does not pay it stays off under `auto`: BERT-family blocks with bitblend's
own attention kernel ran 0.61x eager (docs/benchmarks.md), tiny models spend longer
compiling than training, and multi-process, fp8 and LoRA runs are not measured compiled.
"""

from __future__ import annotations

from torch import nn

from bitblend.config.schema import Recipe
from bitblend.train.distributed import transformer_blocks

# Measured to pay at llama-30m (width 384); llama-15m (256, the pretrain-mix recipe) spent
# +77 s compiling in a 20-step run for a gain not measured, so narrower blocks stay eager.
MIN_AUTO_WIDTH = 384
AUTO_MODEL_TYPES = ("llama",)  # config.model_type; measured to pay (docs/benchmarks.md)
AUTO_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


def cxx_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend will call (its own search: on Linux it looks
    for g++ alone), or None when it finds none that runs."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return str(get_cpp_compiler())
    except Exception:
        return None


def compile_decision(
    recipe: Recipe, backbone: nn.Module, device_type: str, world_size: int, precision: str
) -> tuple[bool, str]:
    """(compile?, why) for this run: `model.compile` on/off as asked; auto by the rule in
    the module docstring. `why` is one phrase for the run header and summary.json."""
    asked = recipe.model.compile
    if asked == "eager":
        return False, "off (model.compile: eager)"
    if asked == "blocks":
        return True, "blocks (model.compile: blocks)"
    config = getattr(backbone, "config", None)
    kind = getattr(config, "model_type", "")
    width = int(getattr(config, "hidden_size", 0) or 0)
    reasons = []
    if kind not in AUTO_MODEL_TYPES:
        reasons.append(f"{kind or 'this backbone'} is not measured compiled")
    elif width < MIN_AUTO_WIDTH:
        reasons.append(f"width {width} < {MIN_AUTO_WIDTH}")
    if device_type != "cpu":
        reasons.append(f"{device_type} is not measured compiled")
    elif cxx_compiler() is None:
        reasons.append("no C++ compiler that inductor finds")
    if world_size > 1:
        reasons.append("several processes")
    if precision not in AUTO_PRECISIONS:
        reasons.append(f"{precision} is not measured compiled")
    if recipe.model.adapter.kind != "none":
        reasons.append("LoRA adapters")
    if reasons:
        return False, "off (auto: " + "; ".join(reasons) + ")"
    return True, "blocks (auto: Llama blocks on CPU)"


def compile_blocks(model: nn.Module) -> int:
    """torch.compile every transformer block of `model` in place; returns how many.

    `dynamic=None`: the first shapes compile static (packed rows are all `max_length`);
    a second shape (an eval batch, a shorter padded batch) recompiles once with dynamic
    sizes instead of once per shape."""
    import torch._dynamo

    # A block that fails to compile (a broken C++ toolchain, an inductor error) runs eager
    # with dynamo's warning instead of ending the run in an inductor traceback.
    torch._dynamo.config.suppress_errors = True
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(dynamic=None)
    return len(blocks)
