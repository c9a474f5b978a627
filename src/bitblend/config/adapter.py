"""Cross-field rules of `model.adapter` and `precision.base_bits` (docs/peft.md)."""

from __future__ import annotations

from bitblend.config.schema import Recipe
from bitblend.errors import BitblendError


def check_adapter(recipe: Recipe) -> None:
    """One-line errors for adapter settings that cannot work or would silently do nothing."""
    a = recipe.model.adapter
    for i, task in enumerate(recipe.tasks):
        if task.adapter != "own":
            continue
        if a.kind == "none":
            raise BitblendError(
                f"tasks[{i}].adapter: own gives the task its own LoRA adapter; it needs "
                "model.adapter.kind: lora"
            )
        if recipe.mixing.batches != "homogeneous":
            raise BitblendError(
                f"tasks[{i}].adapter: own routes whole batches through the task's adapter; "
                "it needs mixing.batches: homogeneous (mixed batches share one adapter)"
            )
    if a.kind == "none":
        if recipe.precision.base_bits is not None:
            raise BitblendError(
                f"precision.base_bits: {recipe.precision.base_bits} stores a frozen backbone; "
                "it needs model.adapter.kind: lora (without adapters every weight trains)"
            )
        return
    if a.r < 1:
        raise BitblendError(f"model.adapter.r: expected an integer >= 1, got {a.r}")
    if a.alpha <= 0:
        raise BitblendError(f"model.adapter.alpha: expected a number > 0, got {a.alpha}")
    if not 0.0 <= a.dropout < 1.0:
        raise BitblendError(f"model.adapter.dropout: expected a number in [0, 1), got {a.dropout}")
    if isinstance(a.targets, list) and not a.targets:
        raise BitblendError(
            "model.adapter.targets: expected a non-empty list of layer names or all-linear"
        )
    if recipe.precision.recipe in ("fp8", "fp8-emulated"):
        raise BitblendError(
            f"precision.recipe: {recipe.precision.recipe} swaps the backbone's Linear layers, "
            "which model.adapter.kind lora freezes and wraps; use bf16-mixed or bf16-true"
        )
