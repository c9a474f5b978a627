"""`bitblend eval` and `bitblend predict`: reload a finished run and use its model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitblend.config.load import read_yaml, recipe_from_dict
from bitblend.config.schema import Recipe, TaskConfig
from bitblend.data.modalities import EncodedSplit, encode_split
from bitblend.data.sources import _labels_to_targets, _read_file, load_task_data, read_inputs
from bitblend.errors import BitblendError
from bitblend.models.trunk import MultiTaskModel, load_model
from bitblend.precision.recipes import PrecisionRecipe, build_precision
from bitblend.tasks.losses import resolve_loss
from bitblend.train.evaluate import predict_outputs, score, softmax
from bitblend.train.setup import pick_device


@dataclass
class LoadedRun:
    """A finished run's recipe and model, ready for inference."""

    run_dir: Path
    recipe: Recipe
    model: MultiTaskModel
    tokenizer: Any
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

    def outputs(self, task: TaskConfig, split: EncodedSplit) -> tuple[np.ndarray, float]:
        """Head outputs and mean loss of `task` over `split`."""
        cfg = self.recipe.train
        return predict_outputs(
            self.model,
            task.name,
            split,
            context=self.precision.forward_context,
            device=self.device,
            batch_size=cfg.eval_batch_size,
            pad_id=int(self.tokenizer.pad_token_id or 0),
            multiple=cfg.pad_to_multiple_of,
            loss=resolve_loss(task.head, task.loss),
        )


def load_run(run_dir: Path) -> LoadedRun:
    """Reload recipe.yaml and model/ of a run directory."""
    if not (run_dir / "recipe.yaml").is_file():
        raise BitblendError(f"{run_dir}: not a bitblend run directory (no recipe.yaml)")
    if not (run_dir / "model").is_dir():
        raise BitblendError(f"{run_dir}: the run has no final model/ (did it finish?)")
    recipe = recipe_from_dict(read_yaml(run_dir / "recipe.yaml"), str(run_dir / "recipe.yaml"))
    device = pick_device(recipe.train.device)
    model, tokenizer, _ = load_model(run_dir / "model")
    precision = build_precision(recipe.precision, device)
    precision.convert_module(model)
    return LoadedRun(run_dir, recipe, model, tokenizer, precision, device)


def evaluate_run(
    run: LoadedRun, data: Path | None, task_name: str | None
) -> dict[str, dict[str, float]]:
    """Metrics per task on the run's own eval split, or on `data` for one task."""
    results: dict[str, dict[str, float]] = {}
    ml = run.recipe.model.max_length
    if data is None:
        for i, task in enumerate(run.recipe.tasks):
            if task_name is not None and task.name != task_name:
                continue
            td = load_task_data(task, i, run.recipe.train.seed)
            split = encode_split(
                run.tokenizer, td.eval.texts, td.eval.labels, ml, task.head == "regression"
            )
            out, loss = run.outputs(task, split)
            results[task.name] = {**score(task.head, out, split.targets), "loss": loss}
        return results
    i, task = run.task(task_name)
    raw = _read_file(data, task.text_column, task.label_column, "--data")
    label_names = run.model.specs[task.name].label_names
    targets = _labels_to_targets(raw, task.head, label_names, str(data), f"tasks[{i}]")
    split = encode_split(run.tokenizer, raw.texts, targets, ml, task.head == "regression")
    out, loss = run.outputs(task, split)
    results[task.name] = {**score(task.head, out, split.targets), "loss": loss}
    return results


def predict_file(run: LoadedRun, input_path: Path, task_name: str | None) -> list[dict[str, Any]]:
    """One prediction per input row: label and class probabilities, or a value."""
    _, task = run.task(task_name)
    texts = read_inputs(input_path, task.text_column)
    ml = run.recipe.model.max_length
    regression = task.head == "regression"
    split = encode_split(run.tokenizer, texts, [0.0] * len(texts), ml, regression)
    cfg = run.recipe.train
    out, _ = predict_outputs(
        run.model,
        task.name,
        split,
        context=run.precision.forward_context,
        device=run.device,
        batch_size=cfg.eval_batch_size,
        pad_id=int(run.tokenizer.pad_token_id or 0),
        multiple=cfg.pad_to_multiple_of,
    )
    if regression:
        return [{"task": task.name, "value": float(v)} for v in out[:, 0]]
    names = run.model.specs[task.name].label_names
    probs = softmax(out)
    return [
        {
            "task": task.name,
            "label": names[int(p.argmax())],
            "probs": {n: round(float(x), 6) for n, x in zip(names, p, strict=True)},
        }
        for p in probs
    ]
