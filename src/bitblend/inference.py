"""`bitblend eval` and `bitblend predict`: reload a finished run and use its model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitblend.config.load import read_yaml, recipe_from_dict
from bitblend.config.schema import Recipe, TaskConfig
from bitblend.data.modalities import POOLED_HEADS, EncodedSplit
from bitblend.data.sources import (
    load_table,
    load_task_data,
    map_targets,
    read_inputs,
    table_from_columns,
)
from bitblend.errors import BitblendError
from bitblend.models.trunk import MultiTaskModel, load_model
from bitblend.precision.recipes import PrecisionRecipe, build_precision
from bitblend.tasks.losses import resolve_loss
from bitblend.train.evaluate import BatchSpec, evaluate_split, predict_outputs, softmax
from bitblend.train.setup import encode_task, pick_device


@dataclass
class LoadedRun:
    """A finished run's recipe and model, ready for inference."""

    run_dir: Path
    recipe: Recipe
    model: MultiTaskModel
    tokenizer: Any
    task_tokenizers: dict[str, Any]
    precision: PrecisionRecipe
    device: torch.device

    def task(self, name: str | None) -> tuple[int, TaskConfig]:
        """The task called `name`, or the only task when `name` is None."""
        tasks = self.recipe.tasks
        if name is None:
            if len(tasks) > 1:
                names = ", ".join(t.name for t in tasks)
                raise BitblendError(f"--task: this run has several tasks; expected one of {names}")
            return 0, tasks[0]
        for i, t in enumerate(tasks):
            if t.name == name:
                return i, t
        raise BitblendError(f"--task {name}: expected one of {', '.join(t.name for t in tasks)}")

    def encode(self, task: TaskConfig, table: Any, targets: Any) -> EncodedSplit:
        """Encode a table exactly as training did (tokenizer, patches, feature statistics)."""
        tok = self.task_tokenizers.get(task.name, self.tokenizer)
        return encode_task(task, self.model.specs[task.name], table, targets, tok, self.recipe)

    def batch_spec(self, task: TaskConfig) -> BatchSpec:
        """Batching for inference with the run's precision."""
        tok = self.task_tokenizers.get(task.name, self.tokenizer)
        return BatchSpec(
            context=self.precision.forward_context,
            device=self.device,
            batch_size=self.recipe.train.eval_batch_size,
            pad_id=int(getattr(tok, "pad_token_id", 0) or 0),
            multiple=self.recipe.train.pad_to_multiple_of,
            mask_token=getattr(tok, "mask_token_id", None),
            vocab_size=len(tok),
        )


def load_run(run_dir: Path) -> LoadedRun:
    """Reload recipe.yaml and model/ of a run directory."""
    if not (run_dir / "recipe.yaml").is_file():
        raise BitblendError(f"{run_dir}: not a bitblend run directory (no recipe.yaml)")
    if not (run_dir / "model").is_dir():
        raise BitblendError(f"{run_dir}: the run has no final model/ (did it finish?)")
    recipe = recipe_from_dict(read_yaml(run_dir / "recipe.yaml"), str(run_dir / "recipe.yaml"))
    device = pick_device(recipe.train.device)
    model, tokenizer, meta = load_model(run_dir / "model")
    precision = build_precision(recipe.precision, device)
    precision.convert_module(model)
    return LoadedRun(run_dir, recipe, model, tokenizer, meta["task_tokenizers"], precision, device)


def evaluate_run(
    run: LoadedRun, data: Path | None, task_name: str | None
) -> dict[str, dict[str, float]]:
    """Metrics per task on the run's own eval split, or on `data` for one task."""
    results: dict[str, dict[str, float]] = {}
    if data is None:
        for i, task in enumerate(run.recipe.tasks):
            if task_name is not None and task.name != task_name:
                continue
            td = load_task_data(task, i, run.recipe.train.seed)
            split = run.encode(task, td.eval, td.eval_targets)
            loss = resolve_loss(task.head, task.loss)
            results[task.name] = evaluate_split(
                run.model, task.name, split, run.batch_spec(task), loss
            )
        return results
    i, task = run.task(task_name)
    ds = load_table(data, "--data")
    table = table_from_columns({c: ds[c] for c in ds.column_names}, task, str(data), f"tasks[{i}]")
    names = run.model.specs[task.name].label_names
    targets = map_targets(table, task.head, names, str(data), f"tasks[{i}]")
    split = run.encode(task, table, targets)
    loss = resolve_loss(task.head, task.loss)
    results[task.name] = evaluate_split(run.model, task.name, split, run.batch_spec(task), loss)
    return results


def predict_file(run: LoadedRun, input_path: Path, task_name: str | None) -> list[dict[str, Any]]:
    """One prediction per input row: label and class probabilities, labels, or a value."""
    _, task = run.task(task_name)
    if task.head not in POOLED_HEADS:
        raise BitblendError(
            f"--task {task.name}: predict supports classification, binary, multilabel and "
            f"regression heads, not {task.head}"
        )
    table = read_inputs(input_path, task)
    split = run.encode(task, table, np.zeros(len(table), dtype=np.float32))
    out, _ = predict_outputs(run.model, task.name, split, run.batch_spec(task))
    names = run.model.specs[task.name].label_names
    if task.head == "regression":
        return [{"task": task.name, "value": float(v)} for v in out[:, 0]]
    if task.head == "binary":
        p = 1.0 / (1.0 + np.exp(-out[:, 0].astype(np.float64)))
        return [
            {
                "task": task.name,
                "label": names[int(x > 0.5)],
                "probs": {names[1]: round(float(x), 6)},
            }
            for x in p
        ]
    if task.head == "multilabel":
        p = 1.0 / (1.0 + np.exp(-out.astype(np.float64)))
        return [
            {
                "task": task.name,
                "labels": [n for n, x in zip(names, row, strict=True) if x > 0.5],
                "probs": {n: round(float(x), 6) for n, x in zip(names, row, strict=True)},
            }
            for row in p
        ]
    probs = softmax(out)
    return [
        {
            "task": task.name,
            "label": names[int(p.argmax())],
            "probs": {n: round(float(x), 6) for n, x in zip(names, p, strict=True)},
        }
        for p in probs
    ]
