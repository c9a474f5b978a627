"""Report figures (matplotlib, Agg): one PNG per section from the files of run directories.

Each `plot_*` function takes the runs to compare and returns a `Plot`: PNG bytes, or no
image and a short note saying why (a field that is missing or odd never raises). Several
runs are overlaid in one figure: one colour per run, one subplot per task or metric.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

# Figures are made as matplotlib.figure.Figure, never through pyplot: savefig renders PNG
# with the Agg canvas, and no global backend is switched under a user's notebook.
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bitblend.report.rundata import RunData, eval_points, num, series, step_of, task_losses

log = logging.getLogger(__name__)

DPI = 100
MAX_PANELS = 12  # beyond this a figure gets unreadable; the note says what was left out
TITLES = {
    "loss": "Training loss per task",
    "eval": "Evaluation metrics",
    "lr": "Learning rate and gradient norm",
    "loss_scale": "Loss scale and skipped steps",
    "mixture": "Mixture: realised vs target task shares",
    "throughput": "Throughput (tokens/s)",
    "memory": "Peak memory",
}
# Sections only language-model runs have (absent from other reports, not a note there).
LM_TITLES = {"perplexity": "Validation perplexity per domain"}


@dataclass
class Plot:
    """One report section: a PNG, or a note saying why there is none."""

    key: str  # file stem under plots/ and the section's HTML id
    title: str
    png: bytes | None
    note: str = ""


# -- drawing helpers --------------------------------------------------------------------
def _color(i: int) -> str:
    return f"C{i % 10}"


def _panels(n: int, title: str) -> tuple[Figure, list[Axes]]:
    """A figure with n subplots, up to 3 per row."""
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.4 * cols, 3.0 * rows + 0.4), dpi=DPI, layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    return fig, axes[:n]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _smooth(ys: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points, ignoring NaN gaps."""
    out = []
    for i in range(len(ys)):
        chunk = [y for y in ys[max(0, i - window + 1) : i + 1] if not math.isnan(y)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def _line(ax: Axes, xs: list[float], ys: list[float], color: str, label: str) -> None:
    """Raw values faint plus a trailing mean when there are many noisy points."""
    if len(xs) >= 20:
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, _smooth(ys, max(2, len(xs) // 20)), color=color, label=label, linewidth=1.4)
    else:
        ax.plot(xs, ys, color=color, label=label, marker="o", markersize=3, linewidth=1.2)


def _legend(ax: Axes) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def _left_out(names: list[str], what: str) -> str:
    if len(names) <= MAX_PANELS:
        return ""
    return f"Only the first {MAX_PANELS} {what} of {len(names)} are drawn."


def _missing(runs: list[RunData], have: Callable[[RunData], bool], what: str) -> str:
    lacking = [r.label for r in runs if not have(r)]
    return f"No {what} in: {', '.join(lacking)}." if lacking else ""


# -- the sections -----------------------------------------------------------------------
def plot_loss(runs: list[RunData]) -> Plot:
    """Train loss per task vs step; one subplot per task, one colour per run."""
    per_run = [task_losses(r) for r in runs]
    tasks = list(dict.fromkeys(t for losses in per_run for t in losses))
    key, title = "loss", TITLES["loss"]
    if not tasks:
        return Plot(key, title, None, "No train loss values in metrics.jsonl.")
    fig, axes = _panels(min(len(tasks), MAX_PANELS), title)
    for ax, task in zip(axes, tasks, strict=False):
        for i, (run, losses) in enumerate(zip(runs, per_run, strict=True)):
            if task in losses:
                _line(ax, *losses[task], _color(i), run.label)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            _legend(ax)
    note = " ".join(
        x
        for x in (
            _missing(runs, lambda r: bool(task_losses(r)), "train loss"),
            _left_out(tasks, "tasks"),
        )
        if x
    )
    return Plot(key, title, _png(fig), note)


# Metrics that are not bounded by [0, 1]: their axis starts at 0 (or pads a negative range).
UNBOUNDED = ("loss", "mse", "mae", "rmse", "perplexity", "r2", "examples")


def metric_limits(metric: str, values: list[float]) -> tuple[float, float]:
    """The y range of a metric panel, never an auto-zoom onto its own wiggle: a score in
    [0, 1] (accuracy, F1, AUC, ...) gets the whole [0, 1], so 0.9986 -> 0.9932 looks as
    small as it is; an unbounded metric starts at 0, or pads a negative range by 5%."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    name = metric.lower()
    bounded = not any(u in name for u in UNBOUNDED)
    if bounded and lo >= 0.0 and hi <= 1.0:
        return -0.02, 1.02  # scores of exactly 0 or 1 stay visible off the frame
    if lo >= 0.0:
        return 0.0, hi * 1.05 if hi > 0 else 1.0
    pad = 0.05 * max(hi - lo, abs(hi), abs(lo))
    return lo - pad, max(hi, 0.0) + pad


def plot_eval(runs: list[RunData]) -> Plot:
    """Eval metrics; one subplot per metric, a line per run and task (bars if one eval)."""
    per_run = [eval_points(r) for r in runs]
    metrics = list(dict.fromkeys(m for pts in per_run for m in pts))
    key, title = "eval", TITLES["eval"]
    if not metrics:
        return Plot(key, title, None, "No eval lines in metrics.jsonl and no eval.json.")
    fig, axes = _panels(min(len(metrics), MAX_PANELS), title)
    # With eval only at the end (eval_every: 0) a line per task is one dot: bars read better.
    once = all(
        len(xs) <= 1 for pts in per_run for tasks in pts.values() for xs, _ in tasks.values()
    )
    draw = _eval_bars if once else _eval_lines
    for ax, metric in zip(axes, metrics, strict=False):
        draw(ax, runs, [pts.get(metric, {}) for pts in per_run])
        values = [v for pts in per_run for _, ys in pts.get(metric, {}).values() for v in ys]
        ax.set_ylim(*metric_limits(metric, values))
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
        _legend(ax)
    note = " ".join(
        x
        for x in (
            _missing(runs, lambda r: bool(eval_points(r)), "eval metrics"),
            _left_out(metrics, "metrics"),
        )
        if x
    )
    return Plot(key, title, _png(fig), note)


Points = dict[str, tuple[list[float], list[float]]]  # task -> (steps, values)


def _eval_lines(ax: Axes, runs: list[RunData], per_run: list[Points]) -> None:
    """A line per (run, task): colour by task for one run, by run for several."""
    markers = "os^vD<>p*h"
    for i, (run, tasks) in enumerate(zip(runs, per_run, strict=True)):
        for j, (task, (xs, ys)) in enumerate(tasks.items()):
            label = task if len(runs) == 1 else f"{run.label}: {task}"
            color = _color(j) if len(runs) == 1 else _color(i)
            marker = markers[j % len(markers)]
            ax.plot(xs, ys, color=color, marker=marker, markersize=5, linewidth=1.2, label=label)
    ax.set_xlabel("step")


def _eval_bars(ax: Axes, runs: list[RunData], per_run: list[Points]) -> None:
    """Final values: a group of bars per task, one bar per run."""
    tasks = list(dict.fromkeys(t for pts in per_run for t in pts))
    width = 0.8 / len(runs)
    for i, (run, pts) in enumerate(zip(runs, per_run, strict=True)):
        xs = [j - 0.4 + width * (i + 0.5) for j, t in enumerate(tasks) if t in pts]
        ys = [pts[t][1][-1] for t in tasks if t in pts]
        ax.bar(xs, ys, width, color=_color(i), label=run.label if len(runs) > 1 else None)
    ax.set_xticks(range(len(tasks)), tasks, fontsize=7, rotation=20 if len(tasks) > 3 else 0)


def plot_lr(runs: list[RunData]) -> Plot:
    """Learning rate (and gradient norm where logged) vs step, one colour per run."""
    key, title = "lr", TITLES["lr"]
    lrs = [series(r.train, "lr") for r in runs]
    norms = [series(r.train, "grad_norm") for r in runs]
    has_norm = any(xs for xs, _ in norms)
    if not any(xs for xs, _ in lrs):
        return Plot(key, title, None, "No lr values in metrics.jsonl.")
    fig, axes = _panels(2 if has_norm else 1, title)
    for i, run in enumerate(runs):
        axes[0].plot(*lrs[i], color=_color(i), label=run.label, linewidth=1.3)
        if has_norm:
            _line(axes[1], *norms[i], _color(i), run.label)
    axes[0].set_title("learning rate", fontsize=9)
    axes[0].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if has_norm:
        axes[1].set_title("gradient norm (before clipping)", fontsize=9)
    if len(runs) > 1:
        _legend(axes[0])
    return Plot(
        key, title, _png(fig), _missing(runs, lambda r: bool(series(r.train, "lr")[0]), "lr values")
    )


def _skipped_steps(run: RunData) -> list[float]:
    return [s for r in run.train if r.get("skipped") is True and (s := step_of(r)) is not None]


def plot_loss_scale(runs: list[RunData]) -> Plot:
    """Loss scale (16-mixed) vs step with skipped steps marked; cumulative skips otherwise."""
    key, title = "loss_scale", TITLES["loss_scale"]
    scales = [series(r.train, "loss_scale") for r in runs]
    skipped = [_skipped_steps(r) for r in runs]
    total = sum(len(s) for s in skipped)
    if not any(xs for xs, _ in scales) and not total:
        return Plot(
            key,
            title,
            None,
            "No loss scaler in these runs (loss_scale is null: only 16-mixed scales the "
            "loss) and no skipped steps.",
        )
    has_scale = any(xs for xs, _ in scales)
    fig, axes = _panels(2 if has_scale else 1, title)
    if has_scale:
        ax = axes[0]
        for i, run in enumerate(runs):
            xs, ys = scales[i]
            if xs:
                ax.step(xs, ys, where="post", color=_color(i), label=run.label, linewidth=1.3)
                marks = set(skipped[i])
                sx = [x for x in xs if x in marks]
                sy = [y for x, y in zip(xs, ys, strict=True) if x in marks]
                ax.scatter(sx, sy, color=_color(i), marker="x", s=30, zorder=3)
        ax.set_yscale("log", base=2)
        ax.set_title("loss scale (x = skipped step)", fontsize=9)
        _legend(ax)
    ax = axes[-1]
    for i, run in enumerate(runs):
        steps = sorted(skipped[i])
        last = max(series(run.train, "step")[0] or [0.0])
        xs = [0.0, *steps, max(last, steps[-1] if steps else 0.0)]
        ys = [0, *range(1, len(steps) + 1), len(steps)]
        ax.step(xs, ys, where="post", color=_color(i), label=f"{run.label} ({len(steps)})")
    ax.set_title("skipped steps (cumulative)", fontsize=9)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(ax)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return Plot(key, title, _png(fig), f"{total} skipped step(s) in all.")


def _mix_series(run: RunData) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """{"target"|"realised": {task: (steps, shares)}} from metrics.jsonl mix fields."""
    out: dict[str, dict[str, tuple[list[float], list[float]]]] = {"target": {}, "realised": {}}
    for rec in run.train:
        s = step_of(rec)
        for kind in out:
            shares = rec.get(f"mix_{kind}")
            if s is None or not isinstance(shares, dict):
                continue
            for task, value in shares.items():
                v = num(value)
                if v is not None:
                    xs, ys = out[kind].setdefault(str(task), ([], []))
                    xs.append(s)
                    ys.append(v)
    return out


def _summary_mix(run: RunData) -> dict[str, dict[str, float]] | None:
    mix = (run.summary or {}).get("mixture")
    if not isinstance(mix, dict):
        return None
    target, realised = mix.get("target"), mix.get("realised")
    if not isinstance(target, dict) or not isinstance(realised, dict) or len(target) < 2:
        return None
    return {
        "target": {str(k): num(v) or 0.0 for k, v in target.items()},
        "realised": {str(k): num(v) or 0.0 for k, v in realised.items()},
    }


def plot_mixture(runs: list[RunData]) -> Plot:
    """Realised (solid) vs target (dashed) task shares vs step; one subplot per run."""
    key, title = "mixture", TITLES["mixture"]
    per_run = [(r, _mix_series(r), _summary_mix(r)) for r in runs]
    usable = [(r, s, m) for r, s, m in per_run if s["realised"] or m]
    if not usable:
        return Plot(
            key,
            title,
            None,
            "Single-task runs (or no mix_target / mix_realised fields): every step "
            "trains the one task, so there is no mixture to show.",
        )
    fig, axes = _panels(min(len(usable), MAX_PANELS), title)
    for ax, (run, s, m) in zip(axes, usable, strict=False):
        if s["realised"]:
            for j, (task, (xs, ys)) in enumerate(s["realised"].items()):
                ax.plot(xs, ys, color=_color(j), label=task, linewidth=1.4)
                if task in s["target"]:
                    ax.plot(*s["target"][task], color=_color(j), linestyle="--", linewidth=1.0)
            ax.set_xlabel("step")
        elif m:  # only the final shares are known: grouped bars
            tasks = list(m["target"])
            xs_pos = list(range(len(tasks)))
            ax.bar(
                [x - 0.2 for x in xs_pos],
                [m["target"][t] for t in tasks],
                0.4,
                label="target",
                color="0.7",
            )
            ax.bar(
                [x + 0.2 for x in xs_pos],
                [m["realised"].get(t, 0.0) for t in tasks],
                0.4,
                label="realised",
                color="C0",
            )
            ax.set_xticks(xs_pos, tasks, rotation=30, fontsize=7)
        ax.set_ylim(-0.03, 1.03)  # shares of exactly 0 or 1 stay visible off the frame
        ax.set_ylabel("share of examples")
        ax.set_title(f"{run.label} (dashed = target)", fontsize=9)
        ax.grid(alpha=0.3)
        _legend(ax)
    lacking = [r.label for r, s, m in per_run if not (s["realised"] or m)]
    note = f"Single-task (no mixture): {', '.join(lacking)}." if lacking else ""
    note = " ".join(x for x in (note, _left_out([r.label for r, _, _ in usable], "runs")) if x)
    return Plot(key, title, _png(fig), note)


def plot_throughput(runs: list[RunData]) -> Plot:
    """Tokens/s per step (trailing mean) and the run's overall tokens/s."""
    key, title = "throughput", TITLES["throughput"]
    per_step = [series(r.train, "tokens_per_s") for r in runs]
    overall = [(r.label, num((r.summary or {}).get("tokens_per_s"))) for r in runs]
    bars = [(label, v) for label, v in overall if v is not None and math.isfinite(v)]
    if not any(xs for xs, _ in per_step) and not bars:
        return Plot(key, title, None, "No tokens_per_s in metrics.jsonl or summary.json.")
    fig, axes = _panels(2 if bars else 1, title)
    for i, run in enumerate(runs):
        if per_step[i][0]:
            _line(axes[0], *per_step[i], _color(i), run.label)
    axes[0].set_title("per step", fontsize=9)
    axes[0].set_xlabel("step")
    axes[0].grid(alpha=0.3)
    if len(runs) > 1:
        _legend(axes[0])
    if bars:
        _bars(axes[1], [label for label, _ in bars], [v for _, v in bars], "{:.0f}", runs)
        axes[1].set_title("whole run (summary.json)", fontsize=9)
    return Plot(key, title, _png(fig), _missing(runs, lambda r: bool(r.summary), "summary.json"))


def _bars(ax: Axes, labels: list[str], values: list[float], fmt: str, runs: list[RunData]) -> None:
    """One bar per run, coloured like its lines, with the value written on it."""
    colors = {r.label: _color(i) for i, r in enumerate(runs)}
    pos = list(range(len(labels)))
    ax.bar(pos, values, color=[colors.get(x, "C0") for x in labels])
    for x, v in zip(pos, values, strict=True):
        ax.annotate(fmt.format(v), (x, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(
        pos,
        labels,
        rotation=20 if len(labels) > 2 else 0,
        fontsize=7,
        ha="right" if len(labels) > 2 else "center",
    )
    ax.grid(alpha=0.3, axis="y")


def plot_memory(runs: list[RunData]) -> Plot:
    """Peak memory per run from summary.json (CUDA allocator peak, or peak RSS on CPU)."""
    key, title = "memory", TITLES["memory"]
    vals = [(r.label, num((r.summary or {}).get("peak_memory_bytes"))) for r in runs]
    have = [(label, v / 2**30) for label, v in vals if v is not None and math.isfinite(v)]
    if not have:
        return Plot(key, title, None, "No peak_memory_bytes in summary.json.")
    fig, axes = _panels(1, title)
    _bars(axes[0], [label for label, _ in have], [v for _, v in have], "{:.2f} GiB", runs)
    axes[0].set_ylabel("GiB")
    devices = {str((r.summary or {}).get("device", "?")) for r in runs}
    axes[0].set_title(
        "peak RSS of the process" if devices == {"cpu"} else "peak memory", fontsize=9
    )
    lacking = [label for label, v in vals if v is None]
    note = f"No peak_memory_bytes for: {', '.join(lacking)}." if lacking else ""
    return Plot(key, title, _png(fig), note)


SECTIONS: list[Callable[[list[RunData]], Plot]] = [
    plot_loss,
    plot_eval,
    plot_lr,
    plot_loss_scale,
    plot_mixture,
    plot_throughput,
    plot_memory,
]


def _perplexities(run: RunData) -> Points:
    return eval_points(run).get("perplexity", {})


def plot_perplexity(runs: list[RunData]) -> Plot | None:
    """Validation perplexity vs step, one subplot per causal-LM task (domain), one line per
    run, log scale (a model from scratch starts near the vocabulary size); None when no run
    has a perplexity."""
    per_run = [_perplexities(r) for r in runs]
    tasks = list(dict.fromkeys(t for pts in per_run for t in pts))
    if not tasks:
        return None
    key, title = "perplexity", LM_TITLES["perplexity"]
    fig, axes = _panels(min(len(tasks), MAX_PANELS), title)
    for ax, task in zip(axes, tasks, strict=False):
        for i, (run, pts) in enumerate(zip(runs, per_run, strict=True)):
            if task in pts:
                xs, ys = pts[task]
                ax.plot(xs, ys, color=_color(i), marker="o", markersize=4, linewidth=1.2,
                        label=run.label)  # fmt: skip
        if any(v > 0 for pts in per_run for v in pts.get(task, ([], []))[1]):
            ax.set_yscale("log")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3, which="both")
        if len(runs) > 1:
            _legend(ax)
    note = " ".join(
        x
        for x in (
            _missing(runs, lambda r: bool(_perplexities(r)), "validation perplexity"),
            _left_out(tasks, "domains"),
        )
        if x
    )
    return Plot(key, title, _png(fig), note)


LM_SECTIONS: list[Callable[[list[RunData]], Plot | None]] = [plot_perplexity]


def all_plots(runs: list[RunData]) -> list[Plot]:
    """Every section's plot (and the language-model sections where a run has them); a
    section that fails on odd data becomes a note, not an error."""
    plots = []
    for fn in [*SECTIONS, *LM_SECTIONS]:
        try:
            plot = fn(runs)
        except Exception as exc:  # odd values we did not foresee must not lose the report
            log.warning("report section %s skipped: %s", fn.__name__, exc)
            key = fn.__name__.removeprefix("plot_")
            note = f"Not drawn: {exc.__class__.__name__}: {exc}"
            plot = Plot(key, {**TITLES, **LM_TITLES}[key], None, note)
        if plot is not None:
            plots.append(plot)
    return plots
