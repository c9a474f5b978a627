"""The progress reporter: averaged tokens/s on the bar, plain lines by steps or seconds."""

from __future__ import annotations

import io

from rich.console import Console

from bitblend.report.progress import ProgressReporter, fmt_duration


def _record(step: int, tokens: int, loss: float = 1.0) -> dict:
    return {"step": step, "task": "a", "loss": loss, "tokens": tokens}


def test_bar_tokens_per_s_is_an_average_not_the_last_step() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    with ProgressReporter(console, total=10, start=0) as rep:
        rep.step(_record(1, 1000), 1.0)  # 1000 tokens/s
        rep.step(_record(2, 100), 1.0)  # a slow step: 100 tokens/s on its own
        tps = rep._bar.tasks[0].fields["tps"]
    assert tps == "550"  # 1100 tokens over 2 s, not the last step's 100
    assert not rep.plain


def test_plain_lines_every_n_steps_or_t_seconds() -> None:
    out = io.StringIO()
    now = [0.0]
    rep = ProgressReporter(
        Console(file=out, width=200), total=6, start=0, every=0, seconds=10.0,
        clock=lambda: now[0],
    )  # fmt: skip
    with rep:
        for step in range(1, 7):
            now[0] += 4.0  # 4 s per step: a line at step 1, then once 10 s have passed
            rep.step(_record(step, 100, loss=float(step)), 0.5)
    lines = out.getvalue().splitlines()
    assert [x.split()[1] for x in lines] == ["1/6", "4/6", "6/6"], lines
    # step 4's line: the mean loss and tokens/s of steps 2-4, ETA from 4 s per step
    assert "loss a=3.0000 | 200 tokens/s | elapsed 16s eta 8s" in lines[1]
    assert rep.segment() == {
        "start_step": 0, "steps": 6, "tokens": 600, "train_time_s": 3.0, "tokens_per_s": 200.0,
    }  # fmt: skip


def test_durations() -> None:
    assert [fmt_duration(x) for x in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]
