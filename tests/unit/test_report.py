"""report.html and `bitblend bench`: from real tiny runs, every section, images that decode,
several runs side by side, odd files that do not crash, bad input that ends in one line."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import matplotlib.image
import pytest
from PIL import Image
from rich.console import Console

from bitblend.cli import main
from bitblend.config.load import apply_overrides, recipe_from_dict
from bitblend.report.plots import TITLES
from bitblend.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict

PREFIX = "bitblend: error: "
IMG = re.compile(
    r'<section id="([a-z_]+)"><h2>[^<]*</h2>\s*<img src="data:image/png;base64,([^"]+)"'
)


def train(run_dir: Path, *overrides: str, two_tasks: bool = False) -> Path:
    """A real tiny run (6 steps) into run_dir; two_tasks adds 8x8 digits as images."""
    data = tiny_recipe_dict()
    if two_tasks:
        data["tasks"].append({"name": "digits", "data": "digits", "patch_size": 4})
    sets = ["train.steps=6", "train.eval_every=3", "train.batch_size=4", *overrides]
    recipe = recipe_from_dict(apply_overrides(data, sets))
    Trainer(recipe, run_dir, console=Console(quiet=True), show_progress=False).fit()
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One single-task and one two-task run, trained once for the whole module."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "single": train(root / "single"),
        "mixed": train(root / "mixed", "mixing.strategy=uniform", two_tasks=True),
    }


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run without its report, to be edited by a test."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("report.html", "plots"))
    return dst


def embedded(page: str) -> dict[str, bytes]:
    """Section id -> the PNG bytes its <img> carries as a data URI."""
    return {key: base64.b64decode(data) for key, data in IMG.findall(page)}


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `bitblend ARGV` in this process."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit 2 and exactly one `bitblend: error:` line naming every needle."""
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Content and mtime of every file under root."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- the report a run writes itself -----------------------------------------------------
@pytest.mark.slow
def test_train_writes_report_with_every_section(runs: dict[str, Path]) -> None:
    run = runs["mixed"]
    page = (run / "report.html").read_text()
    for key, title in TITLES.items():
        assert f'<section id="{key}"><h2>{title}</h2>' in page
    assert '<section id="summary"><h2>Summary</h2>' in page
    images = embedded(page)
    # fp32 has no loss scaler and skipped nothing: that one section is a note, not a plot.
    assert set(images) == set(TITLES) - {"loss_scale"}
    assert "No loss scaler in these runs" in page
    assert sorted(p.stem for p in (run / "plots").glob("*.png")) == sorted(images)
    for key, png in images.items():
        assert png == (run / "plots" / f"{key}.png").read_bytes()
        with Image.open(io.BytesIO(png)) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert pixels.ndim == 3 and pixels.std() > 0.01  # a drawing, not a blank canvas
    # No external resources: everything the page shows is inside it.
    assert not re.search(r'(src|href)="(?!data:|#)', page)


@pytest.mark.slow
def test_summary_table_has_final_metrics_and_cost(runs: dict[str, Path]) -> None:
    page = (runs["mixed"] / "report.html").read_text()
    summary = json.loads((runs["mixed"] / "summary.json").read_text())
    for row in ("tokens/s", "peak memory", "MFU", "final eval: bbc", "final eval: digits"):
        assert row in page
    assert f"{summary['tokens_per_s']:,.0f}" in page
    assert f"{summary['eval']['digits']['accuracy']:.4f}" in page
    assert "uniform / homogeneous / sum" in page  # the mixing row


@pytest.mark.slow
def test_single_task_run_notes_missing_mixture(runs: dict[str, Path]) -> None:
    page = (runs["single"] / "report.html").read_text()
    assert "mixture" not in embedded(page)
    assert "Single-task runs" in page
    assert {"loss", "eval", "lr", "throughput", "memory"} <= set(embedded(page))


# -- the report command -----------------------------------------------------------------
@pytest.mark.slow
def test_report_several_runs_side_by_side(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    before = {name: snapshot(path) for name, path in runs.items()}
    code, stdout, err = cli(
        ["report", str(runs["single"]), str(runs["mixed"]), "--out", str(out)], capsys
    )
    assert code == 0, err
    assert str(out / "report.html") in stdout
    page = (out / "report.html").read_text()
    header = re.search(r"<thead><tr><th></th>(.*?)</tr></thead>", page)
    assert header and re.findall(r"<th>(.*?)</th>", header.group(1)) == ["single", "mixed"]
    images = embedded(page)
    assert {"loss", "eval", "lr", "mixture", "throughput", "memory"} <= set(images)
    # The overlay has more ink than the one-run plot of the same section.
    one = embedded((runs["single"] / "report.html").read_text())["lr"]
    assert images["lr"] != one
    # The runs themselves are untouched, and writing again into the report dir is fine.
    assert {name: snapshot(path) for name, path in runs.items()} == before
    assert cli(["report", str(runs["mixed"]), "--out", str(out)], capsys)[0] == 0
    assert "mixed" in (out / "report.html").read_text()


@pytest.mark.slow
def test_report_default_out_rewrites_only_the_report(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(runs["single"], tmp_path / "run")
    before = snapshot(run)
    code, _, err = cli(["report", str(run)], capsys)
    assert code == 0, err
    after = snapshot(run)
    assert {
        k: v for k, v in after.items() if k != "report.html" and not k.startswith("plots")
    } == before
    assert "report.html" in after and any(k.startswith("plots/") for k in after)


@pytest.mark.slow
def test_odd_files_skip_sections_with_a_note(runs: dict[str, Path], tmp_path: Path) -> None:
    from bitblend.report.html import write_report

    run = copy_run(runs["mixed"], tmp_path / "odd")
    (run / "summary.json").unlink()
    (run / "eval.json").write_text("{not json")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    odd = []
    for i, line in enumerate(lines):
        rec = json.loads(line)
        if rec.get("split") == "train":
            rec["loss_scale"] = 65536.0 / 2 ** (rec["step"] // 3)  # a 16-mixed-like scale
            rec["skipped"] = rec["step"] == 3
            if i == 1:
                rec["loss"] = rec["task_loss"] = "nan"  # how sinks write a non-finite value
            if i == 2:
                rec["lr"], rec["mix_target"] = "fast", [1, 2]  # wrong types
        odd.append(json.dumps(rec))
    odd += ['{"step": "x", "loss": 1}', "[1, 2]", '{"step": 9, "split": "train", "loss']
    (run / "metrics.jsonl").write_text("\n".join(odd) + "\n")
    page = write_report([run]).read_text()
    images = embedded(page)
    assert "loss_scale" in images  # drawn now that the run has a loss scale
    assert {"loss", "eval", "lr", "mixture", "throughput"} <= set(images)
    assert "memory" not in images and "No peak_memory_bytes in summary.json" in page
    assert "eval.json: unreadable" in page and "2 line(s) that are not JSON objects" in page


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda tmp: tmp / "nope", "no such run directory"),
        (lambda tmp: (tmp / "f.txt").write_text("x") and tmp / "f.txt", "not a directory"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "not a bitblend run directory"),
    ],
)
def test_report_bad_run_dir_is_one_line(
    make: Callable[[Path], Path], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make(tmp_path)
    code, _, err = cli(["report", str(path)], capsys)
    assert_one_line_error(code, err, str(path), needle)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_report_refuses_to_write_into_another_run(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = copy_run(runs["single"], tmp_path / "other")
    before = snapshot(other)
    code, _, err = cli(["report", str(runs["mixed"]), "--out", str(other)], capsys)
    assert_one_line_error(code, err, f"--out {other}", "not a report directory")
    # Two runs into one of them would replace that run's own report: refused as well.
    code, _, err = cli(["report", str(runs["mixed"]), str(other), "--out", str(other)], capsys)
    assert_one_line_error(code, err, f"--out {other}")
    assert snapshot(other) == before


@pytest.mark.slow
def test_report_failure_never_fails_a_finished_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    recipe = recipe_from_dict(apply_overrides(tiny_recipe_dict(), ["train.steps=2"]))
    trainer = Trainer(recipe, run, console=Console(quiet=True), show_progress=False)
    run.mkdir()
    (run / "plots").write_text("a file where the report wants a folder")
    with caplog.at_level(logging.WARNING):
        summary = trainer.fit()
    assert summary["steps"] == 2 and (run / "summary.json").is_file()
    assert not (run / "report.html").exists()
    assert "report.html not written" in caplog.text


# -- bench ------------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_tiny_prints_table_and_writes_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench"
    argv = ["bench", "tiny", "--out", str(out), "--steps", "3", "--set", "train.threads=1"]
    code, stdout, err = cli(argv, capsys)
    assert code == 0, err
    names = [f"{p}-{m}" for p in ("32-true", "bf16-mixed") for m in ("proportional", "uniform")]
    columns = ["tokens/s", "peak mem", "bytes/param", "MFU", "bbc_news acc", "digits acc"]
    for text in ("bitblend bench tiny (4 runs)", *columns, *names):
        assert text in stdout, text
    bench = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in bench["runs"]] == names
    for row in bench["runs"]:
        assert row["steps"] == 3 and row["tokens_per_s"] > 0 and row["peak_memory_bytes"] > 0
        assert 4 <= row["bytes_per_param"] <= 32  # fp32 AdamW: 16 = weights+grads+2 moments
        assert set(row["metrics"]) == {"bbc_news", "digits"}
    precisions = {r["precision"] for r in bench["runs"]}
    assert precisions == {"32-true", "bf16-mixed"}
    page = (out / "report.html").read_text()
    header = re.search(r"<thead><tr><th></th>(.*?)</tr></thead>", page)
    assert header and re.findall(r"<th>(.*?)</th>", header.group(1)) == names
    assert {"loss", "mixture", "throughput", "memory"} <= set(embedded(page))


def test_bench_unknown_suite_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(["bench", "huge", "--out", str(tmp_path / "b")], capsys)
    assert_one_line_error(code, err, "'huge'", "tiny", "demo")
    assert not (tmp_path / "b").exists()
