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


def metrics_table(title: str, results: dict[str, dict[str, float]]) -> Table:
    """One row per task with its metrics."""
    table = Table(title=title)
    table.add_column("task")
    keys: list[str] = []
    for metrics in results.values():
        for k in metrics:
            if k not in keys:
                keys.append(k)
    for k in keys:
        table.add_column(k, justify="right")
    for task, metrics in results.items():
        table.add_row(task, *[_fmt(metrics.get(k)) for k in keys])
    return table


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
