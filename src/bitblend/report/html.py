"""report.html: one self-contained page (PNG plots inlined as data URIs) over one or more runs.

The same PNGs are saved beside it as plots/<section>.png. The page has no scripts and no
external resources, so it opens offline, from a mail attachment or a CI artifact.
"""

from __future__ import annotations

import base64
import html
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitblend.errors import BitblendError
from bitblend.report.console import baseline_cell
from bitblend.report.rundata import RunData, eval_points, load_run, num, run_labels

if TYPE_CHECKING:  # matplotlib loads only once there is something to draw
    from bitblend.report.plots import Plot

REPORT_FILES = {"report.html", "plots"}  # all a report directory holds

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1.5em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em;
     margin-top: 1.6em; }
.meta, .note { color: #666; font-size: 0.9em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f3f3f3; }
tr.group td { background: #fafafa; font-weight: 600; text-align: left; }
td.text { text-align: left; white-space: pre-wrap; font-family: ui-monospace, monospace;
          max-width: 60em; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
"""


# -- the summary table ------------------------------------------------------------------
def _fmt(value: Any, kind: str = "") -> str:
    """A table cell: numbers with units, missing values as '-'."""
    v = num(value)
    if v is None:
        return "-" if value is None or isinstance(value, dict | list) else str(value)
    if not math.isfinite(v):
        return str(v)
    if kind == "int":
        return f"{v:,.0f}"
    if kind == "gib":
        return f"{v / 2**30:.2f} GiB"
    if kind == "s":
        return f"{v:.1f} s"
    if kind == "pct":
        return f"{v:.2%}"
    if kind == "gflops":
        return f"{v / 1e9:.2f} GFLOP/s"
    if kind == "m":
        return f"{v / 1e6:.2f}M"
    if kind == "rate":
        return f"{v:,.0f}"
    return f"{v:.4f}" if isinstance(value, float) else str(value)


def final_eval(run: RunData) -> dict[str, dict[str, Any]]:
    """Final per-task metrics: summary.json, else eval.json, else the last eval lines."""
    for source in ((run.summary or {}).get("eval"), (run.eval_json or {}).get("tasks")):
        if isinstance(source, dict) and source:
            return {str(t): m for t, m in source.items() if isinstance(m, dict)}
    out: dict[str, dict[str, Any]] = {}
    for metric, tasks in eval_points(run).items():
        for task, (_, ys) in tasks.items():
            out.setdefault(task, {})[metric] = ys[-1]
    return out


def summary_rows(runs: list[RunData]) -> list[tuple[str, list[str]]]:
    """(row name, one cell per run); rows whose label starts with '#' are group headings."""

    def get(run: RunData, *keys: str) -> Any:
        node: Any = run.summary or {}
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return node

    def last_step(run: RunData) -> Any:
        steps = [s for r in run.train if (s := num(r.get("step"))) is not None]
        return get(run, "steps") if run.summary else (max(steps) if steps else None)

    def precision(run: RunData) -> str:
        used, asked = get(run, "precision", "recipe"), get(run, "precision", "requested")
        if used is None:
            return "-"
        return f"{used} (asked {asked})" if asked not in (None, used) else str(used)

    def mixing(run: RunData) -> str:
        mix = get(run, "mixture")
        if not isinstance(mix, dict):
            return "-"
        return " / ".join(str(mix.get(k, "?")) for k in ("strategy", "batches", "balancing"))

    rows: list[tuple[str, list[str]]] = [
        ("run directory", [str(r.path) for r in runs]),
        ("recipe", [_fmt(get(r, "recipe")) for r in runs]),
        ("device", [_fmt(get(r, "device")) for r in runs]),
        ("precision", [precision(r) for r in runs]),
        ("compute dtype", [_fmt(get(r, "precision", "compute_dtype")) for r in runs]),
        ("parameters", [_fmt(get(r, "parameters"), "m") for r in runs]),
        ("mixing (strategy / batches / balancing)", [mixing(r) for r in runs]),
        ("steps", [_fmt(last_step(r), "int") for r in runs]),
        ("skipped steps", [_fmt(get(r, "skipped_steps"), "int") for r in runs]),
        ("tokens", [_fmt(get(r, "tokens"), "int") for r in runs]),
        ("tokens/s", [_fmt(get(r, "tokens_per_s"), "rate") for r in runs]),
        ("train time", [_fmt(get(r, "train_time_s"), "s") for r in runs]),
        ("wall time", [_fmt(get(r, "wall_time_s"), "s") for r in runs]),
        ("peak memory", [_fmt(get(r, "peak_memory_bytes"), "gib") for r in runs]),
        ("achieved FLOP/s", [_fmt(get(r, "flops_per_s"), "gflops") for r in runs]),
        ("MFU", [_fmt(get(r, "mfu"), "pct") for r in runs]),
    ]
    finals = [final_eval(r) for r in runs]
    tasks = list(dict.fromkeys(t for f in finals for t in f))
    for task in tasks:
        rows.append((f"# final eval: {task}", []))
        metrics = list(dict.fromkeys(m for f in finals for m in f.get(task, {})))
        for metric in metrics:
            kind = "int" if metric == "examples" else ""
            rows.append((metric, [_fmt(f.get(task, {}).get(metric), kind) for f in finals]))
        if any(isinstance(get(r, "baselines", "tasks", task), dict) for r in runs):
            # The task's simple scikit-learn model on the same rows (train/baselines.py).
            cells = [baseline_cell(get(r, "baselines", "tasks", task)) for r in runs]
            rows.append(("baseline (same split)", cells))
    if any(r.notes for r in runs):
        rows.append(("notes", ["; ".join(r.notes) or "-" for r in runs]))
    return rows


# -- the page ---------------------------------------------------------------------------
SAMPLES_TITLE = "Generated samples"


def _samples(runs: list[RunData]) -> str:
    """Causal-LM runs' samples.json: a row per (run, task) with its prompt and greedy text."""
    esc = html.escape
    several = len(runs) > 1
    head = ("<th>run</th>" if several else "") + "<th>task</th><th>prompt</th><th>generated</th>"
    body = []
    for run in runs:
        for s in run.samples:
            cell = f"<td>{esc(run.label)}</td>" if several else ""
            body.append(
                f'<tr>{cell}<td>{esc(s["task"])}</td><td class="text">{esc(s["prompt"])}</td>'
                f'<td class="text">{esc(s["text"])}</td></tr>'
            )
    note = (
        "Greedy continuations (temperature 0, 32 new tokens at most) of the start of each "
        "causal-LM task's first eval document, from the saved model/ (`bitblend generate "
        "RUN_DIR --prompt PROMPT --temperature 0 --max-new-tokens 32` gives the same text)."
    )
    return (
        f'<section id="samples"><h2>{SAMPLES_TITLE}</h2><table><thead><tr>{head}</tr></thead>'
        f'<tbody>{"".join(body)}</tbody></table><p class="note">{esc(note)}</p></section>'
    )


def _table(runs: list[RunData]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(r.label)}</th>" for r in runs)
    body = []
    for name, cells in summary_rows(runs):
        if name.startswith("# "):
            span = len(runs) + 1
            body.append(f'<tr class="group"><td colspan="{span}">{esc(name[2:])}</td></tr>')
        else:
            tds = "".join(f"<td>{esc(c)}</td>" for c in cells)
            body.append(f"<tr><td>{esc(name)}</td>{tds}</tr>")
    return f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(runs: list[RunData], plots: list[Plot]) -> str:
    """The whole page as a string: summary table first, then one section per plot."""
    esc = html.escape
    names = ", ".join(r.label for r in runs)
    sections = [("summary", "Summary"), *((p.key, p.title) for p in plots)]
    if any(r.samples for r in runs):
        sections.append(("samples", SAMPLES_TITLE))
    nav = " ".join(f'<a href="#{k}">{esc(t)}</a>' for k, t in sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # The page itself makes no requests; an empty data-URI favicon stops the browser
        # from asking for /favicon.ico (a console error when opened from a file or server).
        '<link rel="icon" href="data:,">',
        f"<title>bitblend report: {esc(names)}</title><style>{CSS}</style></head><body>",
        f'<h1>bitblend report</h1><p class="meta">{len(runs)} run(s): {esc(names)} - '
        f"generated {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>",
        f"<nav>{nav}</nav>",
        f'<section id="summary"><h2>Summary</h2>{_table(runs)}</section>',
    ]
    for p in plots:
        parts.append(f'<section id="{esc(p.key)}"><h2>{esc(p.title)}</h2>')
        if p.png is not None:
            data = base64.b64encode(p.png).decode("ascii")
            parts.append(f'<img src="data:image/png;base64,{data}" alt="{esc(p.title)}">')
        if p.note:
            parts.append(f'<p class="note">{esc(p.note)}</p>')
        parts.append("</section>")
    if any(r.samples for r in runs):
        parts.append(_samples(runs))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _write_atomic(path: Path, data: bytes) -> None:
    # temp file + rename: a reader (or a browser reloading) never sees half a file
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is meant to be opened by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_report(runs: list[RunData], out_dir: Path) -> Path:
    """Write out_dir/report.html and out_dir/plots/*.png for loaded runs; returns the page."""
    from bitblend.report.plots import all_plots

    plots = all_plots(runs)
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for p in plots:
        png = plot_dir / f"{p.key}.png"
        if p.png is not None:
            _write_atomic(png, p.png)
        else:
            png.unlink(missing_ok=True)  # a stale plot from an earlier report would mislead
    page = out_dir / "report.html"
    _write_atomic(page, render_html(runs, plots).encode("utf-8"))
    return page


def check_out_dir(out: Path, run_dirs: Sequence[Path]) -> None:
    """--out may be new, empty, an earlier report, or the one run's own directory."""
    if len(run_dirs) == 1 and out.resolve() == run_dirs[0].resolve():
        return
    if not out.exists():
        return
    if not out.is_dir():
        raise BitblendError(f"--out {out}: exists and is not a directory")
    names = {p.name for p in out.iterdir()}
    if names <= REPORT_FILES and not (out / "plots").is_file():
        return
    raise BitblendError(
        f"--out {out}: not empty and not a report directory (it holds "
        f"{', '.join(sorted(names - REPORT_FILES)[:3])}); choose a new or empty --out"
    )


def default_report_dir() -> Path:
    """runs/report-<YYYYmmdd-HHMMSS> under the current directory (several runs, no --out)."""
    return Path("runs") / f"report-{time.strftime('%Y%m%d-%H%M%S')}"


def write_report(run_dirs: Sequence[Path], out: Path | None = None) -> Path:
    """Report over run directories into `out` (default: the run itself, if only one)."""
    if not run_dirs:
        raise BitblendError("report: expected at least one RUN_DIR")
    # Everything that can fail on bad input happens before anything is written.
    labels = run_labels(list(run_dirs))
    runs = [load_run(Path(d), label) for d, label in zip(run_dirs, labels, strict=True)]
    if out is None:
        out = Path(run_dirs[0]) if len(run_dirs) == 1 else default_report_dir()
    check_out_dir(out, run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    return render_report(runs, out)
