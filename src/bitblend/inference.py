"""`bitblend eval` and `bitblend predict`: reload a finished run and use its model.

Three kinds of run answer the same `Predictor` calls: a transformer run (`LoadedRun`), a
TF-IDF + logistic-regression run (`ensemble/classic.py`) and a saved ensemble spec
(`ensemble/spec.py`); `load_run` tells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

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
from bitblend.data.table import Table
from bitblend.errors import BitblendError
from bitblend.models.trunk import MultiTaskModel, load_model
from bitblend.precision.recipes import PrecisionRecipe, build_precision
from bitblend.tasks.losses import resolve_loss
from bitblend.train.evaluate import BatchSpec, evaluate_split, predict_outputs, score, softmax
from bitblend.train.setup import encode_task, pick_device

if TYPE_CHECKING:
    from bitblend.ensemble.classic import ClassicRun
    from bitblend.ensemble.spec import EnsembleRun


class Predictor(Protocol):
    """What eval, predict, ensemble and distill need of any kind of run."""

    run_dir: Path

    @property
    def tasks(self) -> list[TaskConfig]:
        """The run's tasks (their data columns and heads)."""

    def task(self, name: str | None) -> tuple[int, TaskConfig]:
        """The task called `name`, or the only task when `name` is None."""

    def head(self, task: str) -> str:
        """The head of `task` (classification, binary, ...)."""

    def label_names(self, task: str) -> list[str]:
        """Class names of `task` in output order (empty for regression)."""

    def outputs(self, task: str, table: Table) -> np.ndarray:
        """Raw outputs (n, outputs) of `task` on a table: logits, or log-probabilities."""

    def eval_split(self, task: str) -> tuple[Table, np.ndarray]:
        """The run's own held-out table of `task` and its targets."""


def find_task(tasks: list[TaskConfig], name: str | None) -> tuple[int, TaskConfig]:
    """The task called `name`, or the only task when `name` is None (else a one-line error)."""
    if name is None:
        if len(tasks) > 1:
            names = ", ".join(t.name for t in tasks)
            raise BitblendError(f"--task: this run has several tasks; expected one of {names}")
        return 0, tasks[0]
    for i, t in enumerate(tasks):
        if t.name == name:
            return i, t
    raise BitblendError(f"--task {name}: expected one of {', '.join(t.name for t in tasks)}")


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

    @property
    def tasks(self) -> list[TaskConfig]:
        """The recipe's tasks."""
        return self.recipe.tasks

    def task(self, name: str | None) -> tuple[int, TaskConfig]:
        """The task called `name`, or the only task when `name` is None."""
        return find_task(self.recipe.tasks, name)

    def head(self, task: str) -> str:
        """The head of `task`."""
        return self.model.specs[task].head

    def label_names(self, task: str) -> list[str]:
        """Class names of `task` in output order."""
        return list(self.model.specs[task].label_names)

    def outputs(self, task: str, table: Table) -> np.ndarray:
        """Logits (n, outputs) of a pooled head on a table, in the table's order."""
        _, cfg = self.task(task)
        split = self.encode(cfg, table, np.zeros(len(table), dtype=np.float32))
        out, _ = predict_outputs(self.model, task, split, self.batch_spec(cfg))
        return out

    def eval_split(self, task: str) -> tuple[Table, np.ndarray]:
        """The recipe's held-out table of `task` and its targets."""
        i, cfg = self.task(task)
        td = load_task_data(cfg, i, self.recipe.train.seed)
        return td.eval, td.eval_targets

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


Run: TypeAlias = "LoadedRun | ClassicRun | EnsembleRun"


def load_run(run_dir: Path, precision_name: str = "run") -> Run:
    """Reload a run directory (recipe.yaml + model/) or a saved ensemble spec;
    `precision_name` is the serving precision (fastinfer.py: run, fp32, bf16, int8)."""
    from bitblend.ensemble.classic import CLASSIC, load_classic
    from bitblend.ensemble.spec import SPEC_FILE, load_ensemble
    from bitblend.fastinfer import inference_config, quantize_int8

    if (run_dir / SPEC_FILE).is_file():
        return load_ensemble(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise BitblendError(f"{run_dir}: not a bitblend run directory (no recipe.yaml)")
    if not (run_dir / "model").is_dir():
        raise BitblendError(f"{run_dir}: the run has no final model/ (did it finish?)")
    recipe = recipe_from_dict(read_yaml(run_dir / "recipe.yaml"), str(run_dir / "recipe.yaml"))
    if recipe.model.backbone == CLASSIC:
        return load_classic(run_dir, recipe)
    device = pick_device(recipe.train.device)
    model, tokenizer, meta = load_model(run_dir / "model")
    precision = build_precision(inference_config(recipe.precision, precision_name), device)
    precision.convert_module(model)
    if precision_name == "int8":
        quantize_int8(model)
    return LoadedRun(run_dir, recipe, model, tokenizer, meta["task_tokenizers"], precision, device)


def read_labelled(
    data: Path, index: int, task: TaskConfig, head: str, names: list[str]
) -> tuple[Table, np.ndarray]:
    """A labelled CSV/JSONL/Parquet file as a table of `task` and its targets."""
    ds = load_table(data, "--data")
    cols = {c: ds[c] for c in ds.column_names}
    table = table_from_columns(cols, task, str(data), f"tasks[{index}]")
    return table, map_targets(table, head, names, str(data), f"tasks[{index}]")


def output_loss(head: str, outputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy (classification) or binary cross-entropy of raw outputs."""
    if head == "binary":
        z = outputs[:, 0].astype(np.float64)
        y = targets[: len(z)].astype(np.float64)
        return float(np.mean(np.logaddexp(0.0, z) - y * z))
    z = outputs.astype(np.float64)
    logz = z.max(axis=1) + np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1))
    gold = targets[: len(z)].astype(np.int64)
    return float(np.mean(logz - z[np.arange(len(z)), gold]))


def evaluate_outputs(
    run: Predictor, data: Path | None, task_name: str | None
) -> dict[str, dict[str, float]]:
    """`evaluate_run` for runs scored from their outputs (classic models, ensembles)."""
    if data is None:
        names = [t.name for t in run.tasks if task_name is None or t.name == task_name]
        if task_name is not None and not names:
            run.task(task_name)  # the one-line error naming the tasks
        splits = [(name, *run.eval_split(name)) for name in names]
    else:
        i, task = run.task(task_name)
        head, labels = run.head(task.name), run.label_names(task.name)
        splits = [(task.name, *read_labelled(data, i, task, head, labels))]
    results: dict[str, dict[str, float]] = {}
    for name, table, targets in splits:
        head = run.head(name)
        out = run.outputs(name, table)
        loss = output_loss(head, out, targets)
        results[name] = {**score(head, out, targets), "loss": loss, "examples": len(out)}
    return results


def evaluate_run(run: Run, data: Path | None, task_name: str | None) -> dict[str, dict[str, float]]:
    """Metrics per task on the run's own eval split, or on `data` for one task."""
    if not isinstance(run, LoadedRun):
        return evaluate_outputs(run, data, task_name)
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
    names = run.model.specs[task.name].label_names
    table, targets = read_labelled(data, i, task, task.head, names)
    split = run.encode(task, table, targets)
    loss = resolve_loss(task.head, task.loss)
    results[task.name] = evaluate_split(run.model, task.name, split, run.batch_spec(task), loss)
    return results


def predict_file(run: Run, input_path: Path, task_name: str | None) -> list[dict[str, Any]]:
    """One prediction per input row: label and class probabilities, labels, or a value."""
    _, task = run.task(task_name)
    head = run.head(task.name)
    if head not in POOLED_HEADS:
        raise BitblendError(
            f"--task {task.name}: predict supports classification, binary, multilabel and "
            f"regression heads, not {head}"
        )
    table = read_inputs(input_path, task)
    out = run.outputs(task.name, table)
    names = run.label_names(task.name)
    if head == "regression":
        return [{"task": task.name, "value": float(v)} for v in out[:, 0]]
    if head == "binary":
        p = 1.0 / (1.0 + np.exp(-out[:, 0].astype(np.float64)))
        return [
            {
                "task": task.name,
                "label": names[int(x > 0.5)],
                "probs": {names[1]: round(float(x), 6)},
            }
            for x in p
        ]
    if head == "multilabel":
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
