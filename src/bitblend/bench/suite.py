"""`bitblend bench`: a suite of short runs (precision recipes x mixing strategies) compared
in one table (tokens/s, peak memory, bytes/param, MFU, final metrics) and one report.html.

Each run is an ordinary run directory under the suite's directory, so everything that reads
runs (report, eval, predict) works on it; bench.json holds the table's rows.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bitblend.config.load import apply_overrides, read_yaml, recipe_from_dict, resolve_recipe_path
from bitblend.config.schema import Recipe
from bitblend.device import pick_device
from bitblend.errors import BitblendError
from bitblend.estimate.memory import bytes_per_param as per_param
from bitblend.estimate.memory import optimizer_states, precision_spec
from bitblend.report.html import render_report
from bitblend.report.rundata import load_run
from bitblend.train.run_dir import check_new_run_dir, write_json
from bitblend.train.trainer import Trainer

# The metric shown per task in the table, first one present wins.
PRIMARY_METRICS = ("accuracy", "perplexity", "mse", "loss")
SHORT = {"accuracy": "acc", "perplexity": "ppl"}


@dataclass(frozen=True)
class Suite:
    """A grid of short runs: one base recipe under each precision x mixing strategy."""

    recipe: str
    description: str
    precisions: tuple[str, ...]
    strategies: tuple[str, ...]
    steps: int
    tasks: tuple[dict[str, Any], ...] = ()  # replaces the recipe's tasks when given
    overrides: tuple[str, ...] = ()
    cuda_only: tuple[str, ...] = ("16-mixed",)  # fp16 matmuls are ~400x slower on a CPU


SUITES: dict[str, Suite] = {
    # Two tasks of different sizes (so proportional != uniform) on the 1M-param tiny BERT:
    # four runs of a few seconds each.
    "tiny": Suite(
        recipe="tiny",
        description="tiny BERT, BBC News + digits, 2 precisions x 2 mixing strategies",
        precisions=("32-true", "bf16-mixed"),
        strategies=("proportional", "uniform"),
        steps=8,
        tasks=(
            {"name": "bbc_news", "data": "bbc_news", "max_examples": 256},
            {"name": "digits", "data": "digits", "patch_size": 4, "max_examples": 128},
        ),
        overrides=("train.batch_size=8", "train.eval_max_examples=32"),
    ),
    # The default job's five tasks on the real MiniLM, a few minutes on 2 CPU cores.
    "demo": Suite(
        recipe="demo",
        description="MiniLM on the demo's 5 tasks, 4 precisions x 2 mixing strategies",
        precisions=("32-true", "bf16-mixed", "16-mixed", "bf16-true"),
        strategies=("temperature", "uniform"),
        steps=20,
        overrides=("train.eval_max_examples=64", "schedule.warmup_ratio=0.0"),
    ),
}


@dataclass
class BenchRow:
    """One run's line of the table (also a bench.json entry)."""

    name: str
    precision: str
    strategy: str
    steps: int
    tokens_per_s: float | None
    peak_memory_bytes: float | None
    bytes_per_param: float | None
    bytes_per_param_estimated: bool
    mfu: float | None
    skipped_steps: int
    wall_time_s: float | None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class BenchResult:
    """The rows, the suite directory and its report."""

    suite: str
    out: Path
    rows: list[BenchRow]
    report: Path | None
    skipped: list[str]


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def bytes_per_param(summary: dict[str, Any], recipe: Recipe) -> tuple[float | None, bool]:
    """Model state bytes (weights, grads, masters, optimizer states) per parameter.

    Measured when summary.json has it (`model_state_bytes_per_param`, or
    `model_state_bytes` / `parameters`); else the cost model's figure for the precision
    actually used (estimated=True); None when neither is known.
    """
    measured = _num(summary.get("model_state_bytes_per_param"))
    if measured:  # 0 means "not measured" (no step was taken)
        return measured, False
    state, params = _num(summary.get("model_state_bytes")), _num(summary.get("parameters"))
    if state and params:
        return state / params, False
    used = (summary.get("precision") or {}).get("recipe", recipe.precision.recipe)
    try:
        spec = precision_spec(
            str(used),
            master_weights=recipe.precision.master_weights,
            # the width the run used (auto resolved on its device)
            state_bits=int((summary.get("precision") or {}).get("state_bits", 32)),
        )
        states = optimizer_states(recipe.optimizer.name, recipe.optimizer.momentum)
    except (KeyError, ValueError):  # a recipe the cost model does not know
        return None, True
    return per_param(spec, states), True


def suite_recipes(name: str, steps: int | None, overrides: list[str]) -> list[tuple[str, Recipe]]:
    """(run name, validated recipe) for every run of a suite, before anything runs."""
    if name not in SUITES:
        raise BitblendError(f"bench SUITE {name!r}: expected one of {', '.join(SUITES)}")
    if steps is not None and steps < 1:
        raise BitblendError(f"--steps {steps}: expected an integer >= 1")
    suite = SUITES[name]
    base = read_yaml(resolve_recipe_path(suite.recipe))
    if suite.tasks:
        base["tasks"] = [dict(t) for t in suite.tasks]
    base["name"] = f"bench-{name}"
    runs = []
    for precision in suite.precisions:
        for strategy in suite.strategies:
            run_name = f"{precision}-{strategy}"
            sets = [
                *suite.overrides,
                f"train.steps={steps or suite.steps}",
                f"precision.recipe={precision}",
                f"mixing.strategy={strategy}",
                *overrides,  # the user's --set wins
            ]
            data = apply_overrides(copy.deepcopy(base), sets)
            runs.append((run_name, recipe_from_dict(data, f"bench {name}: {run_name}")))
    return runs


def run_suite(
    name: str,
    out: Path | None = None,
    steps: int | None = None,
    overrides: list[str] | None = None,
    console: Console | None = None,
) -> BenchResult:
    """Train every run of suite `name` under `out`, then write bench.json and report.html."""
    console = console or Console(stderr=True)
    # Every recipe is validated before the suite directory is created.
    planned = suite_recipes(name, steps, list(overrides or []))
    runs, left_out = [], []
    for run_name, recipe in planned:
        device = pick_device(recipe.train.device)
        if recipe.precision.recipe in SUITES[name].cuda_only and device.type != "cuda":
            left_out.append(run_name)
            console.print(f"[dim]skip {run_name}: fp16 matmuls have no fast kernels on {device}[/]")
        else:
            runs.append((run_name, recipe))
    out = out or Path("runs") / f"bench-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_new_run_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (run_name, recipe) in enumerate(runs, 1):
        t0 = time.perf_counter()
        trainer = Trainer(recipe, out / run_name, console=Console(quiet=True), show_progress=False)
        summary = trainer.fit()
        rows.append(_row(run_name, recipe, summary))
        console.print(
            f"[{i}/{len(runs)}] {run_name}: {recipe.train.steps} steps in "
            f"{time.perf_counter() - t0:.1f}s"
        )
    write_json(out / "bench.json", {"suite": name, "runs": [asdict(r) for r in rows]})
    report = None
    try:  # the runs and bench.json are the result; a plotting problem must not lose them
        report = render_report([load_run(out / r.name) for r in rows], out)
    except Exception as exc:
        console.print(f"[yellow]report.html not written: {exc}[/]")
    return BenchResult(name, out, rows, report, left_out)


def _row(name: str, recipe: Recipe, summary: dict[str, Any]) -> BenchRow:
    per_param, estimated = bytes_per_param(summary, recipe)
    evals = summary.get("eval") or {}
    return BenchRow(
        name=name,
        precision=str((summary.get("precision") or {}).get("recipe", recipe.precision.recipe)),
        strategy=recipe.mixing.strategy,
        steps=int(summary.get("steps", recipe.train.steps)),
        tokens_per_s=_num(summary.get("tokens_per_s")),
        peak_memory_bytes=_num(summary.get("peak_memory_bytes")),
        bytes_per_param=per_param,
        bytes_per_param_estimated=estimated,
        mfu=_num(summary.get("mfu")),
        skipped_steps=int(summary.get("skipped_steps", 0)),
        wall_time_s=_num(summary.get("wall_time_s")),
        metrics={
            str(t): {k: v for k, v in m.items() if _num(v) is not None}
            for t, m in evals.items()
            if isinstance(m, dict)
        },
    )


def _primary(metrics: dict[str, float]) -> tuple[str, float] | None:
    for key in PRIMARY_METRICS:
        if key in metrics:
            return key, metrics[key]
    return None


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None or not math.isfinite(value) else fmt.format(value)


def bench_table(result: BenchResult) -> Table:
    """The rich table of a suite: one row per run (named <precision>-<mixing strategy>)."""
    rows = result.rows
    table = Table(title=f"bitblend bench {result.suite} ({len(rows)} runs) -> {result.out}")
    table.add_column("run", no_wrap=True)
    table.add_column("precision used", no_wrap=True)
    for col in ("tokens/s", "peak mem", "bytes/param", "MFU", "skipped"):
        table.add_column(col, justify="right")
    tasks = list(dict.fromkeys(t for r in rows for t in r.metrics))
    heads = {}
    for task in tasks:
        keys = [p[0] for r in rows if (p := _primary(r.metrics.get(task, {})))]
        heads[task] = keys[0] if keys else "-"
        table.add_column(f"{task} {SHORT.get(heads[task], heads[task])}", justify="right")
    for r in rows:
        per_param = _cell(r.bytes_per_param, "{:.1f}")
        if r.bytes_per_param is not None and r.bytes_per_param_estimated:
            per_param += " (est.)"
        memory = None if r.peak_memory_bytes is None else r.peak_memory_bytes / 2**30
        table.add_row(
            r.name,
            r.precision,
            _cell(r.tokens_per_s, "{:,.0f}"),
            _cell(memory, "{:.2f} GiB"),
            per_param,
            _cell(r.mfu, "{:.1%}"),
            str(r.skipped_steps),
            *[_cell(r.metrics.get(t, {}).get(heads[t]), "{:.3f}") for t in tasks],
        )
    return table
