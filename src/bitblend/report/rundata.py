"""Reading a run directory for a report: metrics.jsonl, eval.json and summary.json.

Every file may be missing, cut short or hold odd values; reading never fails on them (a
note records what was skipped). Only a path that is no run directory is an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitblend.errors import BitblendError

# Keys of an eval record that are bookkeeping, not metrics.
EVAL_SKIP = {"step", "split", "task", "examples", "epoch", "epochs"}


@dataclass
class RunData:
    """What a report reads from one run directory (any file may be missing)."""

    path: Path
    label: str
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    eval_json: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    # Generated text of causal_lm tasks (samples.json: task, prompt, text), if the run has it.
    samples: list[dict[str, str]] = field(default_factory=list)


def _read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"{path.name}: unreadable ({exc.__class__.__name__}), ignored")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path.name}: expected a JSON object, ignored")
        return None
    return data


def _read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records, bad = [], 0
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        notes.append(f"{path.name}: unreadable ({exc}), ignored")
        return []
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # e.g. a line cut short by a killed run
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: {bad} line(s) that are not JSON objects were skipped")
    return records


def load_run(path: Path, label: str | None = None) -> RunData:
    """Read a run directory; a missing path or a directory that is no run is a BitblendError."""
    if not path.exists():
        raise BitblendError(f"{path}: no such run directory")
    if not path.is_dir():
        raise BitblendError(f"{path}: not a directory; expected a bitblend run directory")
    if not (path / "metrics.jsonl").is_file() and not (path / "summary.json").is_file():
        raise BitblendError(
            f"{path}: not a bitblend run directory (no metrics.jsonl or summary.json)"
        )
    run = RunData(path=path, label=label or path.name)
    records = _read_jsonl(path / "metrics.jsonl", run.notes)
    run.train = [r for r in records if r.get("split", "train") == "train"]
    run.evals = [r for r in records if r.get("split") == "eval"]
    run.eval_json = _read_json(path / "eval.json", run.notes)
    run.summary = _read_json(path / "summary.json", run.notes)
    run.samples = _samples(_read_json(path / "samples.json", run.notes))
    return run


def _samples(data: dict[str, Any] | None) -> list[dict[str, str]]:
    """The well-formed entries of samples.json (odd ones are left out, never an error)."""
    items = (data or {}).get("samples")
    if not isinstance(items, list):
        return []
    keys = ("task", "prompt", "text")
    return [
        {k: str(x[k]) for k in keys}
        for x in items
        if isinstance(x, dict) and all(isinstance(x.get(k), str) for k in keys)
    ]


def run_labels(paths: list[Path]) -> list[str]:
    """Short unique labels: the directory name, with parents added only where names clash."""
    parts = [p.resolve().parts for p in paths]
    depth = 1
    while depth < max(len(p) for p in parts):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
        depth += 1
    return [str(p) for p in paths]


def num(value: Any) -> float | None:
    """A finite-or-not float from a metrics field (sinks write inf/nan as strings), else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # "nan", "inf", "-inf"
        except ValueError:
            return None
    return None


def step_of(rec: dict[str, Any]) -> float | None:
    """The record's step as a float, or None when missing or odd."""
    s = num(rec.get("step"))
    return s if s is not None and math.isfinite(s) else None


def series(records: Iterable[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of a numeric field; records without it are left out."""
    xs, ys = [], []
    for rec in records:
        s, v = step_of(rec), num(rec.get(key))
        if s is None or v is None:
            continue
        xs.append(s)
        ys.append(v if math.isfinite(v) else math.nan)  # a gap, not a broken y-axis
    return xs, ys


def task_losses(run: RunData) -> dict[str, tuple[list[float], list[float]]]:
    """Train loss per task: from `task_loss` (multi-task records) or `task` + `loss`."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for rec in run.train:
        s = step_of(rec)
        if s is None:
            continue
        per = rec.get("task_loss")
        if isinstance(per, dict) and per:
            items = list(per.items())
        else:
            items = [(rec.get("task", "all"), rec.get("loss"))]
        for task, value in items:
            v = num(value)
            if v is None:
                continue
            xs, ys = out.setdefault(str(task), ([], []))
            xs.append(s)
            ys.append(v if math.isfinite(v) else math.nan)
    return out


def eval_points(run: RunData) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """metric -> task -> (steps, values), from metrics.jsonl eval lines or else eval.json."""
    records = run.evals
    if not records and run.eval_json and isinstance(run.eval_json.get("tasks"), dict):
        step = run.eval_json.get("step", 0)
        records = [
            {"step": step, "task": t, **m}
            for t, m in run.eval_json["tasks"].items()
            if isinstance(m, dict)
        ]
    out: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for rec in records:
        s = step_of(rec)
        if s is None:
            continue
        for key, value in rec.items():
            v = num(value)
            if key in EVAL_SKIP or v is None:
                continue
            xs, ys = out.setdefault(key, {}).setdefault(str(rec.get("task", "all")), ([], []))
            xs.append(s)
            ys.append(v if math.isfinite(v) else math.nan)
    return out
