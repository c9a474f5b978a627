"""A saved ensemble spec (a directory holding ensemble.json) as a run.

An ensemble combines runs of any kind (transformer runs in any precision, tfidf-logreg
runs, other ensemble specs) that share one task's label space. The spec directory holds
`ensemble.json` (members, combiner parameters, temperature, data), `labels.json` and
`eval.json`; it loads like any run (runs/load.py), so `eval`, `predict` and `distill`
accept it. Members load through the `load` function given (runs/load.py's `load_run`),
which keeps this module free of an import back to the loader. `bitblend ensemble`
(ensemble/spec.py) fits and writes specs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitblend.config.schema import TaskConfig
from bitblend.data.table import Table
from bitblend.errors import BitblendError
from bitblend.runs.base import Predictor, find_task, read_labelled
from bitblend.runs.combine import Combiner
from bitblend.tasks import calibration as cal

SPEC_FILE = "ensemble.json"
FORMAT = 1
HEADS = ("classification", "binary")
LoadRun = Callable[[Path], Predictor]  # path -> loaded run (runs/load.py's load_run)


@dataclass
class Member:
    """One loaded member and how its classes line up with the ensemble's."""

    path: Path
    run: Predictor
    task: str  # the member's own task name
    perm: np.ndarray  # (C,) member column of each ensemble class
    temperature: float = 1.0  # applied before combining (--calibrate-members), else 1

    def probs(self, head: str, table: Table) -> np.ndarray:
        """(n, C) probabilities in the ensemble's class order."""
        p = cal.to_probs(head, self.run.outputs(self.task, table))[:, self.perm]
        return p if self.temperature == 1.0 else cal.scale(cal.log_probs(p), self.temperature)


def _fmt(names: list[str]) -> str:
    shown = ", ".join(names[:8])
    return f"[{shown}{', ...' if len(names) > 8 else ''}]"


def _labels_of(path: Path, run: Predictor, task: str) -> tuple[list[str], str]:
    """A member's label names for `task` and where they were read (labels.json if any)."""
    file = path / "labels.json"
    if file.is_file():
        labels = json.loads(file.read_text()).get(task)
        if labels is not None:
            return [str(x) for x in labels], str(file)
    return run.label_names(task), str(path)


def _member_task(path: Path, run: Predictor, task: str | None) -> str:
    if task is not None:
        try:
            return run.task(task)[1].name
        except BitblendError as exc:
            raise BitblendError(f"{path}: {exc}") from None
    pooled = [t.name for t in run.tasks if run.head(t.name) in HEADS]
    if len(pooled) != 1:
        have = ", ".join(t.name for t in run.tasks)
        raise BitblendError(f"{path}: has tasks {have}; choose the shared one with --task")
    return pooled[0]


def resolve_members(
    paths: list[Path],
    task: str | None,
    load: LoadRun,
    names: list[str] | None = None,
    where: str = "",
) -> tuple[list[Member], str, list[str]]:
    """Load members with `load`, pick their task, check one head and one label space:
    (members, head, label names). `names` fixes the label order (a saved spec's); else the
    first member's."""
    members: list[Member] = []
    head0 = ""
    origin = where
    for i, path in enumerate(paths):
        run = load(path)
        name = _member_task(path, run, task)
        head = run.head(name)
        if head not in HEADS:
            raise BitblendError(
                f"{path}: task {name} has a {head} head; ensembles combine "
                "classification or binary heads"
            )
        if i == 0:
            head0 = head
        elif head != head0:
            raise BitblendError(
                f"{path}: task {name} has a {head} head, {paths[0]} has {head0}; "
                "ensemble members must share a head"
            )
        labels, source = _labels_of(path, run, name)
        if names is None:
            names, origin = labels, source
        if sorted(labels) != sorted(names) or len(labels) != len(names):
            raise BitblendError(
                f"{source}: task {name} has labels {_fmt(labels)}, {origin} has "
                f"{_fmt(names)}; ensemble members must share a label space"
            )
        perm = np.asarray([labels.index(n) for n in names], dtype=np.int64)
        members.append(Member(path, run, name, perm))
    assert names is not None
    return members, head0, list(names)


def member_matrix(members: list[Member], head: str, table: Table) -> np.ndarray:
    """(M, n, C) probabilities of every member on a table."""
    return np.stack([m.probs(head, table) for m in members])


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation, test) row indices of --data: a seeded permutation, labels unseen."""
    if n < 4:
        raise BitblendError(f"--data: {n} examples; need at least 4 to split validation/test")
    if not 0.0 < val_fraction < 1.0:
        raise BitblendError(f"--val-fraction: expected a number in (0, 1), got {val_fraction}")
    order = np.random.default_rng([seed, 4099]).permutation(n)
    n_val = min(n - 2, max(2, round(n * val_fraction)))
    return np.sort(order[:n_val]), np.sort(order[n_val:])


def member_task_cfg(member: Member, name: str) -> TaskConfig:
    """The first member's task config (its data columns), under the ensemble's task name."""
    return dataclasses.replace(member.run.task(member.task)[1], name=name)


@dataclass
class DataSplit:
    """Where the validation and test examples of an ensemble come from."""

    path: Path
    val_data: Path | None
    val_fraction: float
    seed: int

    def load(self, task: TaskConfig, head: str, names: list[str]) -> dict[str, Any]:
        """{'val': (table, targets), 'test': (table, targets)}."""
        table, y = read_labelled(self.path, 0, task, head, names)
        if self.val_data is not None:
            val = read_labelled(self.val_data, 0, task, head, names)
            return {"val": val, "test": (table, y)}
        val_idx, test_idx = split_indices(len(table), self.val_fraction, self.seed)
        return {
            "val": (table.take(val_idx), y[val_idx]),
            "test": (table.take(test_idx), y[test_idx]),
        }

    def to_json(self) -> dict[str, Any]:
        """Absolute paths, so the spec still finds its data from any directory."""
        return {
            "path": str(self.path.resolve()),
            "val_data": str(self.val_data.resolve()) if self.val_data else None,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
        }


@dataclass
class EnsembleRun:
    """A saved ensemble spec, answering the same calls as a run."""

    run_dir: Path
    spec: dict[str, Any]
    members: list[Member]
    combiner: Combiner
    temperature: cal.Temperature
    task_cfg: TaskConfig
    head_name: str
    names: list[str]
    split: DataSplit

    @property
    def tasks(self) -> list[TaskConfig]:
        """The ensemble's one task."""
        return [self.task_cfg]

    def task(self, name: str | None) -> tuple[int, TaskConfig]:
        """The ensemble's task (checked against `name`)."""
        return find_task([self.task_cfg], name)

    def head(self, task: str) -> str:
        """classification or binary."""
        return self.head_name

    def label_names(self, task: str) -> list[str]:
        """Class names in output order."""
        return list(self.names)

    def probs(self, table: Table, calibrated: bool = True) -> np.ndarray:
        """(n, C) ensemble probabilities, temperature-scaled unless `calibrated` is False."""
        p = self.combiner.predict(member_matrix(self.members, self.head_name, table))
        return self.temperature.apply(cal.log_probs(p)) if calibrated else p

    def outputs(self, task: str, table: Table) -> np.ndarray:
        """Log-probabilities (n, C), or a binary logit (n, 1), of the calibrated ensemble."""
        self.task(task)
        return cal.to_outputs(self.head_name, self.probs(table))

    def eval_split(self, task: str) -> tuple[Table, np.ndarray]:
        """The test part of the data the ensemble was built on (never its validation part)."""
        self.task(task)
        for p in (self.split.path, self.split.val_data):
            if p is not None and not p.is_file():
                raise BitblendError(f"{self.run_dir / SPEC_FILE}: data: {p}: file not found")
        table, y = self.split.load(self.task_cfg, self.head_name, self.names)["test"]
        return table, np.asarray(y)


def _member_paths(spec_dir: Path, spec: dict[str, Any]) -> list[Path]:
    where = spec_dir / SPEC_FILE
    paths = []
    for i, m in enumerate(spec.get("members") or []):
        rel, absolute = spec_dir / str(m.get("run", "")), Path(str(m.get("path", "")))
        found = next(
            (
                p
                for p in (rel, absolute)
                if (p / "recipe.yaml").is_file() or (p / SPEC_FILE).is_file()
            ),
            None,
        )
        if found is None:
            raise BitblendError(
                f"{where}: members[{i}]: run {m.get('run')} not found "
                f"(looked in {rel} and {absolute})"
            )
        paths.append(found)
    if not paths:
        raise BitblendError(f"{where}: members: expected at least one run")
    return paths


def load_ensemble(spec_dir: Path, load: LoadRun) -> EnsembleRun:
    """Reload a spec directory written by `bitblend ensemble`; members load with `load`."""
    where = spec_dir / SPEC_FILE
    try:
        spec = json.loads(where.read_text())
    except json.JSONDecodeError as exc:
        raise BitblendError(f"{where}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if spec.get("format") != FORMAT:
        raise BitblendError(f"{where}: format {spec.get('format')!r}, expected {FORMAT}")
    names = [str(x) for x in spec["label_names"]]
    paths = _member_paths(spec_dir, spec)
    tasks = [str(m["task"]) for m in spec["members"]]
    members = []
    for path, task in zip(paths, tasks, strict=True):
        found, head, _ = resolve_members([path], task, load, names, str(where))
        if head != spec["head"]:
            raise BitblendError(
                f"{where}: {path}: task {task} has a {head} head, the ensemble {spec['head']}"
            )
        members.extend(found)
    for m, entry in zip(members, spec["members"], strict=True):
        m.temperature = float(entry.get("temperature", 1.0))
    combiner = Combiner.from_state(spec["combiner"])
    temperature = cal.Temperature()
    temperature.load_state_dict(spec)
    d = spec["data"]
    split = DataSplit(
        Path(d["path"]),
        Path(d["val_data"]) if d.get("val_data") else None,
        float(d["val_fraction"]),
        int(d["seed"]),
    )
    return EnsembleRun(
        spec_dir,
        spec,
        members,
        combiner,
        temperature,
        member_task_cfg(members[0], spec["task"]),
        spec["head"],
        names,
        split,
    )
