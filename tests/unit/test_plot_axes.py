"""Report plots show metrics on honest axes, not auto-zoomed onto their own wiggle (#22)."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.figure import Figure

from bitblend.report import plots
from bitblend.report.plots import metric_limits
from bitblend.report.rundata import RunData


def test_scores_in_unit_interval_get_the_whole_interval() -> None:
    assert metric_limits("roc_auc", [0.9986, 0.9932]) == (-0.02, 1.02)
    assert metric_limits("accuracy", [0.0, 1.0]) == (-0.02, 1.02)


def test_unbounded_metrics_start_at_zero_or_pad_honestly() -> None:
    lo, hi = metric_limits("loss", [0.41, 0.40])  # a loss below 1 is still not a score
    assert lo == 0.0 and hi == pytest.approx(0.41 * 1.05)
    lo, hi = metric_limits("mse", [12.0, 30.0])
    assert lo == 0.0 and hi == pytest.approx(31.5)
    lo, hi = metric_limits("r2", [-0.5, 0.9])
    assert lo < -0.5 and hi > 0.9 and hi - lo < 1.6
    assert metric_limits("accuracy", [float("nan")]) == (0.0, 1.0)


def test_eval_plot_axes_use_those_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Figure] = []
    monkeypatch.setattr(plots, "_png", lambda fig: seen.append(fig) or b"png")
    evals = [
        {"step": s, "split": "eval", "task": "t", "roc_auc": v, "loss": loss}
        for s, v, loss in ((10, 0.9986, 0.05), (20, 0.9932, 0.07))
    ]
    plot = plots.plot_eval([RunData(path=Path("r"), label="r", evals=evals)])
    assert plot.png == b"png"
    limits = {ax.get_title(): ax.get_ylim() for ax in seen[0].axes if ax.get_visible()}
    assert limits["roc_auc"] == pytest.approx((-0.02, 1.02))
    assert limits["loss"][0] == 0.0
