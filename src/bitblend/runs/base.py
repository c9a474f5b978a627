"""What every kind of finished run answers (`Predictor`), and helpers all backends share."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from bitblend.config.schema import TaskConfig
from bitblend.data.sources import load_table, map_targets, table_from_columns
from bitblend.data.table import Table
from bitblend.errors import BitblendError


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


def read_labelled(
    data: Path,
    index: int,
    task: TaskConfig,
    head: str,
    names: list[str],
    options: dict[str, str] | None = None,
) -> tuple[Table, np.ndarray]:
    """A labelled CSV/JSONL/Parquet file as a table of `task` and its targets; a missing
    column's hint names `options` (the command's column options) where it has them."""
    ds = load_table(data, "--data")
    cols = {c: ds[c] for c in ds.column_names}
    table = table_from_columns(cols, task, str(data), "the run", options=options)
    return table, map_targets(table, head, names, str(data), f"tasks[{index}]")
