"""`bitblend ensemble`: fit a combiner and temperatures, score members and ensemble, and
save a spec directory (ensemble.json; loaded back as a run by runs/spec.py).

`--data` is split, with a seeded permutation that never looks at labels, into a validation
part (weights, meta-learner, temperatures are fitted there) and a test part (only scored);
`--val-data` gives the validation part as its own file instead. The spec directory holds
`ensemble.json` (members, combiner parameters, temperature, data), `labels.json` and
`eval.json` (per member and ensemble metrics before/after temperature scaling).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table as RichTable

from bitblend.runs.combine import Combiner, cross_fit
from bitblend.runs.load import load_run
from bitblend.runs.spec import (
    FORMAT,
    SPEC_FILE,
    DataSplit,
    member_matrix,
    member_task_cfg,
    resolve_members,
)
from bitblend.tasks import calibration as cal
from bitblend.train.run_dir import check_new_run_dir, write_json


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
    check_new_run_dir(out)
    members, head, names = resolve_members(run_dirs, task, load_run)
    name = task or members[0].task
    cfg = member_task_cfg(members[0], name)
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
