"""`bitblend ensemble` and the saved ensemble spec (a directory holding ensemble.json).

An ensemble combines runs of any kind (transformer runs in any precision, tfidf-logreg
runs, other ensemble specs) that share one task's label space. `--data` is split, with a
seeded permutation that never looks at labels, into a validation part (weights,
meta-learner, temperatures are fitted there) and a test part (only scored); `--val-data`
gives the validation part as its own file instead. The spec directory holds
`ensemble.json` (members, combiner parameters, temperature, data), `labels.json` and
`eval.json` (per member and ensemble metrics before/after temperature scaling), and loads
with `load_run` like any run: `eval`, `predict` and `distill` accept it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitblend.config.schema import TaskConfig
from bitblend.data.table import Table
from bitblend.ensemble import calibration as cal
from bitblend.ensemble.combine import Combiner, cross_fit
from bitblend.errors import BitblendError
from bitblend.inference import Predictor, find_task, load_run, read_labelled

SPEC_FILE = "ensemble.json"
FORMAT = 1
HEADS = ("classification", "binary")


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
    paths: list[Path], task: str | None, names: list[str] | None = None, where: str = ""
) -> tuple[list[Member], str, list[str]]:
    """Load members, pick their task, check one head and one label space: (members, head,
    label names). `names` fixes the label order (a saved spec's); else the first member's."""
    members: list[Member] = []
    head0 = ""
    origin = where
    for i, path in enumerate(paths):
        run = load_run(path)
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


def _task_cfg(member: Member, name: str) -> TaskConfig:
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


def load_ensemble(spec_dir: Path) -> EnsembleRun:
    """Reload a spec directory written by `bitblend ensemble`."""
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
        found, head, _ = resolve_members([path], task, names, str(where))
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
        _task_cfg(members[0], spec["task"]),
        spec["head"],
        names,
        split,
    )


def _report(
    p_val: np.ndarray, y_val: np.ndarray, p_test: np.ndarray, y_test: np.ndarray
) -> dict[str, Any]:
    """Test metrics before and after a temperature fitted on the validation predictions."""
    temp = cal.Temperature().fit(cal.log_probs(p_val), y_val)
    return {
        "temperature": temp.value,
        "before": cal.metrics(p_test, y_test),
        "after": cal.metrics(temp.apply(cal.log_probs(p_test)), y_test),
    }


def fit_ensemble(
    method: str,
    val: np.ndarray,
    y_val: np.ndarray,
    test: np.ndarray,
    y_test: np.ndarray,
    seed: int = 0,
    calibrate_members: bool = False,
) -> tuple[Combiner, dict[str, Any]]:
    """Fit a combiner and temperatures on validation data; score members and it on test.

    val/test: (M, n, C) member probabilities. The test labels reach nothing but the
    metrics: the combiner and every temperature see validation labels only. With
    `calibrate_members`, each member's validation temperature is applied before combining
    (an under-confident member would otherwise lose weight it deserves).
    """
    members = [_report(val[m], y_val, test[m], y_test) for m in range(val.shape[0])]
    if calibrate_members:
        temps = [r["temperature"] for r in members]
        val = np.stack([cal.scale(cal.log_probs(v), t) for v, t in zip(val, temps, strict=True)])
        test = np.stack([cal.scale(cal.log_probs(v), t) for v, t in zip(test, temps, strict=True)])
    combiner = Combiner(method, val.shape[0], val.shape[2]).fit(val, y_val)
    oof = cross_fit(combiner, val, y_val, seed=seed)
    report = {
        "members": members,
        "calibrate_members": calibrate_members,
        "ensemble": _report(oof, y_val, combiner.predict(test), y_test),
    }
    return combiner, report


def build_ensemble(
    run_dirs: list[Path],
    method: str,
    split: DataSplit,
    task: str | None,
    out: Path,
    calibrate_members: bool = False,
) -> dict[str, Any]:
    """`bitblend ensemble`: fit, score and save a spec directory; returns eval.json's data."""
    from bitblend.train.run_dir import check_new_run_dir, write_json

    check_new_run_dir(out)
    members, head, names = resolve_members(run_dirs, task)
    name = task or members[0].task
    cfg = _task_cfg(members[0], name)
    parts = split.load(cfg, head, names)
    (t_val, y_val), (t_test, y_test) = parts["val"], parts["test"]
    t0 = time.perf_counter()
    val = member_matrix(members, head, t_val)
    test = member_matrix(members, head, t_test)
    seconds = time.perf_counter() - t0
    combiner, report = fit_ensemble(
        method, val, np.asarray(y_val), test, np.asarray(y_test), split.seed, calibrate_members
    )
    for m, r in zip(members, report["members"], strict=True):
        r["run"] = str(m.path)
        m.temperature = r["temperature"] if calibrate_members else 1.0
    report |= {
        "method": method,
        "task": name,
        "head": head,
        "label_names": names,
        "data": split.to_json(),
        "validation_examples": len(y_val),
        "test_examples": len(y_test),
        "member_inference_s": seconds,
    }
    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "format": FORMAT,
        "kind": "ensemble",
        "method": method,
        "task": name,
        "head": head,
        "label_names": names,
        "members": [
            {
                "run": os.path.relpath(m.path.resolve(), out.resolve()),
                "path": str(m.path.resolve()),
                "task": m.task,
                "temperature": m.temperature,
            }
            for m in members
        ],
        "combiner": combiner.state_dict(),
        "temperature": report["ensemble"]["temperature"],
        "data": split.to_json(),
    }
    write_json(out / SPEC_FILE, spec)
    write_json(out / "labels.json", {name: names})
    write_json(out / "eval.json", report)
    return report


def report_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, member or ensemble report) rows for a table: members first."""
    rows = [(Path(r["run"]).name, r) for r in report["members"]]
    return [*rows, (f"ensemble ({report['method']})", report["ensemble"])]


def render_report(report: dict[str, Any], console: Any) -> None:
    """The per-member and ensemble table, before and after temperature scaling."""
    from rich.table import Table as RichTable

    t = RichTable(
        title=f"{report['task']}: {report['test_examples']} test examples "
        f"(fitted on {report['validation_examples']})"
    )
    for col in (
        "model",
        "accuracy",
        "macro_f1",
        "nll",
        "ece",
        "brier",
        "T",
        "nll@T",
        "ece@T",
        "brier@T",
    ):
        t.add_column(col, justify="left" if col == "model" else "right")
    for name, r in report_rows(report):
        b, a = r["before"], r["after"]
        t.add_row(
            name,
            *(f"{b[k]:.4f}" for k in ("accuracy", "macro_f1", "nll", "ece", "brier")),
            f"{r['temperature']:.2f}",
            *(f"{a[k]:.4f}" for k in ("nll", "ece", "brier")),
        )
    console.print(t)
