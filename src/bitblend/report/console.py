"""Terminal output: the training progress bar and the per-task result table (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


def make_progress(console: Console, disable: bool = False) -> Progress:
    """A progress bar showing step, loss, tokens/s and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=False,
    )


def metrics_table(
    title: str,
    results: dict[str, dict[str, float]],
    baselines: dict[str, dict[str, Any]] | None = None,
) -> Table:
    """One row per task with its metrics; with `baselines` (train/baselines.py results) a
    `baseline` column beside them: the simple model's value of the task's main metric and
    its name, or "-" and the reason when the task's kind has none."""
    table = Table(title=title)
    table.add_column("task")
    keys: list[str] = []
    for metrics in results.values():
        for k in metrics:
            if k not in keys:
                keys.append(k)
    # The baseline column sits right after the metric it is compared on.
    at = len(keys)
    if baselines is not None:
        at = next((keys.index(k) + 1 for k in ("accuracy", "mse") if k in keys), len(keys))
    for j, k in enumerate(keys):
        if j == at and baselines is not None:
            table.add_column("baseline", justify="right")
        table.add_column(k, justify="right")
    if at == len(keys) and baselines is not None:
        table.add_column("baseline", justify="right")
    for task, metrics in results.items():
        cells = [_fmt(metrics.get(k)) for k in keys]
        if baselines is not None:
            cells.insert(at, baseline_cell(baselines.get(task)))
        table.add_row(task, *cells)
    return table


def baseline_cell(result: dict[str, Any] | None) -> str:
    """`0.9722 (logreg)`: the value of the task's main metric (accuracy; mse for
    regression), or `- (reason)` for a task without a baseline."""
    if not result:
        return "-"
    if result.get("model") is None:
        return f"- ({result.get('reason', 'none')})"
    return f"{_fmt(result.get('value'))} ({result['model']})"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
