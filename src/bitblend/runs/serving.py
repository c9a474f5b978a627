"""Which precision a finished run is served in (`predict --precision`, `bench-infer`).

Serving precisions:
- run: the training recipe's forward (fp8 recipes serve in bf16-mixed: no fp8 GEMMs here)
- fp32: everything in fp32
- bf16: weights and matmuls in bf16 (norms and heads fp32), half the weight memory
- int8: dynamic quantisation of the trunk's Linear layers (int8 weights per channel,
  activations quantised per token at run time) with torchao; heads stay fp32

Any serving precision applies to a run trained in any precision: the saved weights are
brought back to fp32 first (what training starts from), then converted (transformer.py).
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from bitblend.config.schema import PrecisionConfig, PrecisionName
from bitblend.errors import BitblendError
from bitblend.optim.lowbit import quiet_import

INFER_PRECISIONS = ("run", "fp32", "bf16", "int8")


def check_serving(name: str) -> None:
    """A one-line error unless `name` is a serving precision."""
    if name not in INFER_PRECISIONS:
        raise BitblendError(f"--precision {name}: expected one of {', '.join(INFER_PRECISIONS)}")


def inference_config(trained: PrecisionConfig, name: str) -> PrecisionConfig:
    """The precision recipe a run is served with (training-only settings reset)."""
    check_serving(name)
    base = replace(trained, state_bits=32, rounding="nearest", master_weights=True)
    if name == "run":
        if trained.recipe in ("fp8", "fp8-emulated"):
            return replace(base, recipe="bf16-mixed")
        return base
    serve: dict[str, PrecisionName] = {"fp32": "32-true", "bf16": "bf16-true", "int8": "32-true"}
    # A LoRA run's low-bit frozen base (precision.base_bits) is a training format: the other
    # serving precisions store every weight their own way.
    return replace(base, recipe=serve[name], base_bits=None)


def quantize_int8(model: nn.Module) -> int:
    """Dynamic int8 quantisation of the trunk's Linear layers in place; returns how many."""
    q = quiet_import("torchao.quantization", "lowbit", "--precision int8")
    names = {
        n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith("backbone.")
    }
    q.quantize_(
        model,
        q.Int8DynamicActivationInt8WeightConfig(),
        filter_fn=lambda m, fqn: fqn in names,
    )
    return len(names)
