"""`bitblend merge --method lora-merge`: one LoRA run folded into a full model.

The run's frozen base (model/, dequantised when it was stored in 8 or 4 bits) plus its
adapter (model/adapter/) become W + (alpha / r) * B @ A per adapted layer (peft's
`merge_and_unload`), saved as a plain run directory: no peft needed to load it, and it
computes what the adapter run computes (within float rounding of the fold).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from bitblend.config.load import dump_recipe
from bitblend.config.schema import AdapterConfig, Recipe
from bitblend.errors import BitblendError
from bitblend.models.adapters import load_adapter, merge_lora
from bitblend.models.backbones import count_parameters
from bitblend.models.trunk import load_model
from bitblend.report.console import metrics_table
from bitblend.runs.evaluate import evaluate_run
from bitblend.runs.load import KIND_NAMES, run_kind, run_recipe
from bitblend.runs.transformer import TransformerRun, serve_model
from bitblend.train.run_dir import check_new_run_dir, write_json


def merged_recipe(recipe: Recipe) -> Recipe:
    """The recipe of the merged run: no adapter, no frozen low-bit base."""
    model = dataclasses.replace(recipe.model, adapter=AdapterConfig())
    precision = dataclasses.replace(recipe.precision, base_bits=None)
    return dataclasses.replace(
        recipe, model=model, precision=precision, name=f"{recipe.name}-lora-merge"
    )


def run_lora_merge(
    run_dirs: list[Path], out: Path, data: Path | None = None, console: Any = None
) -> dict[str, Any]:
    """Fold one LoRA run's adapter into its base and write a run directory; returns summary."""
    if len(run_dirs) != 1:
        raise BitblendError(
            f"merge --method lora-merge: expected one run directory, got {len(run_dirs)}"
        )
    path = run_dirs[0]
    kind = run_kind(path)
    if kind != "transformer":
        raise BitblendError(f"{path}: lora-merge needs a LoRA run; this is {KIND_NAMES[kind]}")
    check_new_run_dir(out)
    wall0 = time.perf_counter()
    recipe = run_recipe(path)
    for i, task in enumerate(recipe.tasks):
        if task.adapter == "own":
            raise BitblendError(
                f"{path}: tasks[{i}].adapter: own: lora-merge folds one adapter into the "
                f"base, and task {task.name} has its own; train with adapter: shared to merge"
            )
    model, tokenizer, meta = load_model(path / "model")  # fp32 base, as saved
    if not load_adapter(model, path / "model", meta):
        raise BitblendError(
            f"{path}: merge --method lora-merge needs a run trained with model.adapter.kind "
            "lora (this run has no model/adapter/)"
        )
    merge_lora(model)
    recipe = merged_recipe(recipe)
    extra = {
        k: v
        for k, v in meta.items()
        if k not in ("format", "pooling", "head_dropout", "heads", "task_tokenizers", "adapter")
    }
    extra["merge"] = {"method": "lora-merge", "runs": [str(path)], "adapter": meta["adapter"]}
    tokenizers = meta["task_tokenizers"]
    precision, device = serve_model(model, recipe)
    run = TransformerRun(out, recipe, model, tokenizer, tokenizers, precision, device)
    results = evaluate_run(run, data, None)
    # Written only now: a failed merge leaves nothing behind. Saved from an fp32 copy of
    # the same weights (serving may have cast them).
    out.mkdir(parents=True, exist_ok=True)
    saved, _, _ = load_model(path / "model")
    load_adapter(saved, path / "model", meta)
    merge_lora(saved)
    saved.save(out / "model", tokenizer, tokenizers, extra=extra)
    (out / "recipe.yaml").write_text(dump_recipe(recipe))
    labels = {n: s.label_names for n, s in saved.specs.items() if s.label_names}
    write_json(out / "labels.json", labels)
    write_json(out / "eval.json", {"step": 0, "tasks": results})
    summary = {
        "recipe": recipe.name,
        "merge": extra["merge"],
        "parameters": count_parameters(saved),
        "precision": precision.describe(),
        "wall_time_s": time.perf_counter() - wall0,
        "eval": results,
    }
    write_json(out / "summary.json", summary)
    if console is not None:
        console.print(metrics_table("merge lora-merge: eval", results))
        console.print(f"-> {out}")
    return summary
