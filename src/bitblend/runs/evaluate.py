"""`bitblend eval` and `bitblend predict` on any kind of finished run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bitblend.config.schema import TaskConfig
from bitblend.data.modalities import POOLED_HEADS
from bitblend.data.sources import COLUMN_OPTIONS, load_task_data, read_inputs
from bitblend.errors import BitblendError
from bitblend.numeric import log_softmax, sigmoid, softmax
from bitblend.runs.base import Predictor, read_labelled
from bitblend.runs.load import Run
from bitblend.runs.transformer import TransformerRun
from bitblend.tasks.losses import resolve_loss
from bitblend.train.evaluate import evaluate_split, score


def output_loss(head: str, outputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy (classification) or binary cross-entropy of raw outputs."""
    if head == "binary":
        z = outputs[:, 0].astype(np.float64)
        y = targets[: len(z)].astype(np.float64)
        return float(np.mean(np.logaddexp(0.0, z) - y * z))
    logp = log_softmax(outputs, axis=1)
    gold = targets[: len(logp)].astype(np.int64)
    return float(-np.mean(logp[np.arange(len(logp)), gold]))


def with_columns(task: TaskConfig, columns: dict[str, Any] | None) -> TaskConfig:
    """`task` reading a user file's columns by the names given on the command line
    (--text-column and friends; None values keep the run's own names)."""
    given = {k: v for k, v in (columns or {}).items() if v is not None}
    return replace(task, **given) if given else task


def evaluate_outputs(
    run: Predictor,
    data: Path | None,
    task_name: str | None,
    columns: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """`evaluate_run` for runs scored from their outputs (classic models, ensembles)."""
    if data is None:
        names = [t.name for t in run.tasks if task_name is None or t.name == task_name]
        if task_name is not None and not names:
            run.task(task_name)  # the one-line error naming the tasks
        splits = [(name, *run.eval_split(name)) for name in names]
    else:
        i, task = run.task(task_name)
        task = with_columns(task, columns)
        head, labels = run.head(task.name), run.label_names(task.name)
        splits = [(task.name, *read_labelled(data, i, task, head, labels, COLUMN_OPTIONS))]
    results: dict[str, dict[str, float]] = {}
    for name, table, targets in splits:
        head = run.head(name)
        out = run.outputs(name, table)
        loss = output_loss(head, out, targets)
        results[name] = {**score(head, out, targets), "loss": loss, "examples": len(out)}
    return results


def evaluate_run(
    run: Run, data: Path | None, task_name: str | None, columns: dict[str, Any] | None = None
) -> dict[str, dict[str, float]]:
    """Metrics per task on the run's own eval split, or on `data` for one task (whose
    columns `columns` may rename: text_column, label_column, ...)."""
    if not isinstance(run, TransformerRun):
        return evaluate_outputs(run, data, task_name, columns)
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
    task = with_columns(task, columns)
    names = run.model.specs[task.name].label_names
    table, targets = read_labelled(data, i, task, task.head, names, COLUMN_OPTIONS)
    split = run.encode(task, table, targets)
    loss = resolve_loss(task.head, task.loss)
    results[task.name] = evaluate_split(run.model, task.name, split, run.batch_spec(task), loss)
    return results


def check_predictable(run: Predictor, task: str) -> str:
    """The head of `task`, or a one-line error when predict cannot serve it."""
    head = run.head(task)
    if head not in POOLED_HEADS:
        raise BitblendError(
            f"--task {task}: predict supports classification, binary, multilabel and "
            f"regression heads, not {head}"
        )
    return head


def predictions(run: Predictor, task: str, out: np.ndarray) -> list[dict[str, Any]]:
    """One prediction per row of raw outputs (n, outputs): label and class probabilities,
    labels, or a value (what `predict` writes and `serve` answers)."""
    head = run.head(task)
    names = run.label_names(task)
    if head == "regression":
        return [{"task": task, "value": float(v)} for v in out[:, 0]]
    if head == "binary":
        p = sigmoid(out[:, 0])
        return [
            {"task": task, "label": names[int(x > 0.5)], "probs": {names[1]: round(float(x), 6)}}
            for x in p
        ]
    if head == "multilabel":
        p = sigmoid(out)
        return [
            {
                "task": task,
                "labels": [n for n, x in zip(names, row, strict=True) if x > 0.5],
                "probs": {n: round(float(x), 6) for n, x in zip(names, row, strict=True)},
            }
            for row in p
        ]
    probs = softmax(out, axis=1)
    return [
        {
            "task": task,
            "label": names[int(p.argmax())],
            "probs": {n: round(float(x), 6) for n, x in zip(names, p, strict=True)},
        }
        for p in probs
    ]


def predict_file(
    run: Run, input_path: Path, task_name: str | None, columns: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One prediction per input row: label and class probabilities, labels, or a value."""
    _, task = run.task(task_name)
    task = with_columns(task, columns)
    check_predictable(run, task.name)
    table = read_inputs(input_path, task)
    return predictions(run, task.name, run.outputs(task.name, table))
