"""Every catalogued bad input ends in exit code 2 and ONE line on stderr, no traceback.

Most cases call `bitblend.cli.main` in-process (fast); a few run the real command in a
subprocess, where library warnings or a traceback would really reach stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bitblend.cli import main
from bitblend.errors import BitblendError

TINY = ["--set", "train.steps=1", "--set", "train.batch_size=2", "--quiet"]
PREFIX = "bitblend: error: "


@pytest.fixture(autouse=True)
def _offline_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # main() sets these itself with setdefault; set them here so they are undone afterwards.
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        monkeypatch.setenv(key, "1")
    monkeypatch.chdir(tmp_path)  # a default `runs/` dir would land here, not in the repo


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `bitblend ARGV` run in this process."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors exit instead of returning
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str, prefix: str = PREFIX) -> str:
    """Exit 2, exactly one line on stderr starting with `prefix`, naming `needles`."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith(prefix), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Content and mtime of every file under `root`."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def recipe(tmp: Path, body: str) -> Path:
    """A recipe file with a valid task unless `body` brings its own `tasks:`."""
    tasks = "" if "tasks:" in body else "tasks:\n  - name: t\n    data: bbc_news\n"
    return write(tmp / "r.yaml", body + tasks)


def csv_rows(n: int, label: Callable[[int], str] = lambda i: "ab"[i % 2]) -> str:
    return "text,label\n" + "".join(f"text {i},{label(i)}\n" for i in range(1, n + 1))


# Each case: tmp dir -> (argv without --out, things the error line must name).
Case = Callable[[Path], tuple[list[str], list[str]]]


def bad_key(tmp: Path) -> tuple[list[str], list[str]]:
    r = recipe(tmp, "model:\n  backbon: tiny-bert\n")
    return [str(r)], [str(r), "model.backbon: unknown key (did you mean backbone?)"]


def bad_enum(tmp: Path) -> tuple[list[str], list[str]]:
    r = recipe(tmp, "tasks:\n  - name: t\n    data: bbc_news\n    head: clf\n")
    return [str(r)], [str(r), "tasks[0].head: expected one of classification, ", "'clf'"]


def bad_type(tmp: Path) -> tuple[list[str], list[str]]:
    r = recipe(tmp, "model:\n  backbone: tiny-bert\n  max_length: ten\n")
    return [str(r)], [str(r), "model.max_length: expected an integer, got 'ten'"]


def bad_type_in_set(tmp: Path) -> tuple[list[str], list[str]]:
    argv = ["tiny", "--set", "train.eval_every=ten"]
    return argv, ["tiny.yaml", "train.eval_every: expected an integer"]


def missing_recipe(tmp: Path) -> tuple[list[str], list[str]]:
    return [str(tmp / "missing.yaml")], ["missing.yaml: recipe file not found"]


def unknown_builtin(tmp: Path) -> tuple[list[str], list[str]]:
    return ["no-such-recipe"], ["no-such-recipe: not a recipe file nor a built-in", "demo"]


def malformed_yaml(tmp: Path) -> tuple[list[str], list[str]]:
    r = write(tmp / "r.yaml", "model:\n  backbone: tiny-bert\n  max_length: 16\n bad: x\n")
    return [str(r)], [str(r), "line 4", "invalid YAML"]


def csv_without_text_column(tmp: Path) -> tuple[list[str], list[str]]:
    data = write(tmp / "d.csv", "body,label\nhello,a\nworld,b\n")
    return ["tiny", "--set", f"tasks.0.data={data}"], [str(data), "column 'text' not found"]


def csv_empty_label(tmp: Path) -> tuple[list[str], list[str]]:
    data = write(tmp / "d.csv", "text,label\nhello,a\nworld,\nagain,b\n")
    return ["tiny", "--set", f"tasks.0.data={data}"], [str(data), "row 2", "'label' is empty"]


def regression_label_not_numeric(tmp: Path) -> tuple[list[str], list[str]]:
    data = write(tmp / "d.csv", csv_rows(10, lambda i: "high" if i == 4 else f"{i}.5"))
    argv = ["tiny", "--set", f"tasks.0.data={data}", "--set", "tasks.0.head=regression"]
    return argv, [str(data), "row ", "label 'high' is not a number"]


def data_not_found(tmp: Path) -> tuple[list[str], list[str]]:
    data = tmp / "nope.csv"
    return ["tiny", "--set", f"tasks.0.data={data}"], ["tasks[0].data", str(data), "not found"]


def unsupported_extension(tmp: Path) -> tuple[list[str], list[str]]:
    data = write(tmp / "d.txt", "hello\n")
    argv = ["tiny", "--set", f"tasks.0.data={data}"]
    return argv, ["tasks[0].data", str(data), "expected a .csv, .jsonl, .json or .parquet"]


def bad_set_syntax(tmp: Path) -> tuple[list[str], list[str]]:
    return ["tiny", "--set", "train.steps"], ["--set train.steps: expected KEY=VALUE"]


def bad_set_index(tmp: Path) -> tuple[list[str], list[str]]:
    return ["tiny", "--set", "tasks.3.weight=2"], ["--set tasks.3.weight", "list index below 1"]


CASES: list[Case] = [
    bad_key,
    bad_enum,
    bad_type,
    bad_type_in_set,
    missing_recipe,
    unknown_builtin,
    malformed_yaml,
    csv_without_text_column,
    csv_empty_label,
    regression_label_not_numeric,
    data_not_found,
    unsupported_extension,
    bad_set_syntax,
    bad_set_index,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_train_bad_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, needles = case(tmp_path)
    out_dir = tmp_path / "run"
    code, _, err = run_cli(["train", *argv, *TINY, "--out", str(out_dir)], capsys)
    assert_one_line_error(code, err, *needles)
    assert not out_dir.exists()  # a bad recipe or bad data fails before anything is written


@pytest.mark.parametrize(
    "case", [bad_key, bad_enum, malformed_yaml, bad_set_syntax], ids=lambda c: c.__name__
)
def test_validate_bad_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, needles = case(tmp_path)
    code, out, err = run_cli(["validate", *argv], capsys)
    assert_one_line_error(code, err, *needles)
    assert out == ""


def test_out_dir_not_empty_is_left_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "run"
    (out_dir / "checkpoints").mkdir(parents=True)
    write(out_dir / "metrics.jsonl", '{"step": 1}\n')
    write(out_dir / "checkpoints" / "keep.txt", "precious")
    before = snapshot(out_dir)
    code, _, err = run_cli(["train", "tiny", *TINY, "--out", str(out_dir)], capsys)
    assert_one_line_error(code, err, f"--out {out_dir}", "not empty", "--resume")
    assert snapshot(out_dir) == before


def test_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = write(tmp_path / "run", "a file")
    code, _, err = run_cli(["train", "tiny", *TINY, "--out", str(target)], capsys)
    assert_one_line_error(code, err, f"--out {target}")
    assert target.read_text() == "a file"


def test_resume_a_non_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_run = tmp_path / "stuff"
    not_a_run.mkdir()
    write(not_a_run / "notes.txt", "hi")
    before = snapshot(not_a_run)
    code, _, err = run_cli(["train", "--resume", str(not_a_run)], capsys)
    assert_one_line_error(code, err, f"--resume {not_a_run}", "not a bitblend run directory")
    assert snapshot(not_a_run) == before
    code, _, err = run_cli(["train", "--resume", str(tmp_path / "missing")], capsys)
    assert_one_line_error(code, err, "missing", "not a bitblend run directory")


def test_resume_with_a_recipe_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["train", "tiny", "--resume", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "--resume")


def test_predict_output_exists_is_left_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = write(tmp_path / "preds.jsonl", '{"old": true}\n')
    inputs = write(tmp_path / "in.jsonl", '{"text": "hello"}\n')
    argv = ["predict", str(tmp_path / "run"), "--input", str(inputs), "--output", str(existing)]
    code, out, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, f"--output {existing}", "already exists")
    assert existing.read_text() == '{"old": true}\n'
    assert out == ""


def test_usage_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["train", "--bogus"], capsys)
    assert_one_line_error(code, err, "--bogus")
    # A verb's own usage errors have the same prefix as every other error.
    code, _, err = run_cli(["predict", str(tmp_path)], capsys)  # --input is required
    assert_one_line_error(code, err, "--input")


def test_debug_shows_the_exception(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(BitblendError, match="no-such-recipe"):
        main(["--debug", "validate", "no-such-recipe"])


# -- the real command, in a subprocess -----------------------------------------------------


def run_subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bitblend.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.slow
def test_subprocess_bad_data_file(tmp_path: Path) -> None:
    # The whole stack is imported here (torch, transformers, datasets): any warning or log
    # line they print would show up as a second line on stderr.
    argv, needles = csv_without_text_column(tmp_path)
    out_dir = tmp_path / "run"
    proc = run_subprocess(["train", *argv, *TINY, "--out", str(out_dir)], tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, *needles)
    assert not out_dir.exists()


@pytest.mark.slow
def test_subprocess_bad_recipe_and_usage(tmp_path: Path) -> None:
    argv, needles = bad_enum(tmp_path)
    proc = run_subprocess(["validate", *argv], tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, *needles)
    proc = run_subprocess(["train", "--bogus"], tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, "--bogus")


@pytest.mark.slow
def test_subprocess_predict_output_exists(tmp_path: Path) -> None:
    existing = write(tmp_path / "preds.jsonl", "keep\n")
    inputs = write(tmp_path / "in.jsonl", '{"text": "hello"}\n')
    argv = ["predict", str(tmp_path), "--input", str(inputs), "--output", str(existing)]
    proc = run_subprocess(argv, tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, f"--output {existing}")
    assert existing.read_text() == "keep\n"
