"""Training progress for people: a rich bar on a terminal, plain lines in logs.

With stdout not a terminal (nohup, CI, SLURM, `> log`) a bar prints nothing until the end,
so the reporter writes one line every `train.progress_every` steps or
`train.progress_seconds` seconds (step, loss per task, tokens/s over the interval, ETA) and
one line per evaluation as it happens. It also keeps the segment's totals - the tokens and
seconds of the steps this process ran - so throughput after a resume comes from the same
steps as its time.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

from rich.console import Console

from bitblend.report.console import make_progress

WINDOW = 20  # steps the bar's tokens/s averages over


def fmt_duration(seconds: float) -> str:
    """1h02m, 4m05s or 12s."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def step_losses(record: dict[str, Any]) -> dict[str, float]:
    """Task -> loss of one train record (mixed batches carry one loss per task)."""
    if isinstance(record.get("task_loss"), dict):
        return {str(k): float(v) for k, v in record["task_loss"].items()}
    return {str(record["task"]): float(record["loss"])}


def eval_line(step: int, evals: dict[str, dict[str, float]]) -> str:
    """`eval step 40: bbc accuracy=0.8125 macro_f1=0.79 loss=0.5213 | ...`."""
    parts = []
    for task, metrics in evals.items():
        shown = " ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
        )
        parts.append(f"{task} {shown}")
    return f"eval step {step}: " + " | ".join(parts)


class ProgressReporter:
    """What the trainer calls once per step (`step`) and once per evaluation (`evaluated`)."""

    def __init__(
        self,
        console: Console,
        total: int,
        start: int,
        *,
        enabled: bool = True,
        every: int = 0,
        seconds: float = 30.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.console = console
        self.total, self.start = total, start
        self.enabled = enabled
        self.every, self.seconds = every, seconds
        self.clock = clock
        self.plain = enabled and not console.is_terminal
        self._bar = make_progress(console, disable=not enabled or self.plain)
        self._bar_task: Any = None
        self._t0 = clock()
        # The segment: steps this process trained, their tokens and their step seconds.
        self.steps = 0
        self.tokens = 0
        self.step_seconds = 0.0
        self.best_tokens_per_s = 0.0  # the fastest step's (a run beating the probe shows here)
        self._window: deque[tuple[int, float]] = deque(maxlen=WINDOW)
        # Since the last plain line: tokens, step seconds, losses per task.
        self._since_tokens, self._since_seconds, self._since_time = 0, 0.0, self._t0
        self._since_losses: dict[str, list[float]] = {}

    def __enter__(self) -> ProgressReporter:
        self._bar.__enter__()
        self._bar_task = self._bar.add_task(
            "train", total=self.total, completed=self.start, loss="-", tps="-"
        )
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._bar.__exit__(kind, exc, tb)

    def segment(self) -> dict[str, Any]:
        """This process's steps: first step, count, tokens, step seconds, tokens/s."""
        return {
            "start_step": self.start,
            "steps": self.steps,
            "tokens": self.tokens,
            "train_time_s": self.step_seconds,
            "tokens_per_s": self.tokens / self.step_seconds if self.step_seconds else 0.0,
        }

    def step(self, record: dict[str, Any], seconds: float) -> None:
        """Account one finished step (`seconds` of its own) and show it."""
        tokens = int(record.get("tokens", 0))
        self.steps += 1
        self.tokens += tokens
        self.step_seconds += seconds
        self._window.append((tokens, seconds))
        if seconds > 0:
            self.best_tokens_per_s = max(self.best_tokens_per_s, tokens / seconds)
        self._since_tokens += tokens
        self._since_seconds += seconds
        for task, loss in step_losses(record).items():
            self._since_losses.setdefault(task, []).append(loss)
        if not self.enabled:
            return
        if not self.plain:
            win_tokens = sum(t for t, _ in self._window)
            win_seconds = sum(s for _, s in self._window)
            tps = f"{win_tokens / win_seconds:.0f}" if win_seconds else "-"
            self._bar.update(self._bar_task, advance=1, loss=f"{record['loss']:.4f}", tps=tps)
            return
        step = int(record["step"])
        now = self.clock()
        due = (
            self.steps == 1
            or step >= self.total
            or (self.every and step % self.every == 0)
            or (self.seconds and now - self._since_time >= self.seconds)
        )
        if due:
            self.console.print(self._line(step, now), markup=False, highlight=False)
            self._since_tokens, self._since_seconds, self._since_time = 0, 0.0, now
            self._since_losses = {}

    def _line(self, step: int, now: float) -> str:
        losses = " ".join(
            f"{task}={sum(v) / len(v):.4f}" for task, v in sorted(self._since_losses.items())
        )
        tps = self._since_tokens / self._since_seconds if self._since_seconds else 0.0
        elapsed = now - self._t0
        # Wall time per step of this segment, evaluations and checkpoints included.
        eta = elapsed / self.steps * (self.total - step)
        pct = 100.0 * step / max(1, self.total)
        return (
            f"step {step}/{self.total} ({pct:.0f}%) loss {losses} | {tps:.0f} tokens/s | "
            f"elapsed {fmt_duration(elapsed)} eta {fmt_duration(eta)}"
        )

    def evaluated(self, step: int, evals: dict[str, dict[str, float]]) -> None:
        """Show an evaluation's results as they happen (above the bar on a terminal)."""
        if self.enabled:
            self.console.print(eval_line(step, evals), markup=False, highlight=False)


def run_footer(summary: dict[str, Any]) -> str:
    """The end-of-run lines after the table: MFU and its probe, the resumed segment's own
    throughput, and how many epochs each task saw."""
    lines = []
    probe = summary.get("probe") or {}
    if summary.get("mfu") is not None:
        lines.append(
            f"MFU {summary['mfu']:.1%}: {summary['flops_per_s'] / 1e9:.3g} of "
            f"{summary['peak_flops_per_s'] / 1e9:.3g} GFLOP/s peak "
            f"(probe {probe.get('source', '?')}, {fmt_duration(probe.get('age_s', 0))} old, "
            f"load {probe.get('load_avg_at_probe', 0):.2f} then)"
        )
    elif summary.get("mfu_note"):
        lines.append(f"MFU {summary['mfu_note']}")
    seg = summary.get("segment")
    if seg:
        first, last = seg["start_step"] + 1, seg["start_step"] + seg["steps"]
        lines.append(
            f"resumed at step {seg['start_step']}: steps {first}-{last} ran at "
            f"{seg['tokens_per_s']:.0f} tokens/s; the whole run {summary['tokens_per_s']:.0f}"
        )
    epochs = (summary.get("mixture") or {}).get("epochs") or {}
    if epochs:
        lines.append("epochs: " + ", ".join(f"{k} {v:.2f}" for k, v in epochs.items()))
    return "\n".join(lines)
