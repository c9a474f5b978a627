"""Every hint in an error names something the command in hand accepts (#22 item 7).

Two checks: (1) statically, every `--option` written in a BitblendError message in the
source is an option of some bitblend command, and every recipe key a hint tells the user to
set exists in the schema; (2) live, the missing-column errors of train, eval --data and
predict are parsed and their hint is fed back to that command's parser."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from bitblend.cli import build_parser, main
from bitblend.config.load import field_docs
from tests.unit.test_cli_errors import run_cli, write

SRC = Path(__file__).resolve().parents[2] / "src" / "bitblend"
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)(\.[\w\[\]]+)?")
SET_KEY = re.compile(r"\bset ((?:tasks\[[\w{}]+\]|[a-z_]+)\.[a-z_.]+)")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _recipe_keys() -> set[str]:
    return {key for key, _, _ in field_docs()}


def _normalise(key: str) -> str:
    """tasks[0].label_column / tasks[{}].x -> tasks[i].label_column (field_docs' spelling)."""
    return re.sub(r"\[[^\]]*\]", "[i]", key)


def _error_texts() -> list[tuple[str, str]]:
    """(file:line, literal text) of every string inside a BitblendError(...) call."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "BitblendError"):
                continue
            parts = []
            for sub in ast.walk(node):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    parts.append(sub.value)
                elif isinstance(sub, ast.FormattedValue):
                    parts.append("{}")
            out.append((f"{path.relative_to(SRC)}:{node.lineno}", "".join(parts)))
    return out


def test_every_option_named_in_an_error_exists() -> None:
    parser = build_parser()
    known = _options(parser) | {o for sp in _subparsers(parser).values() for o in _options(sp)}
    texts = _error_texts()
    assert len(texts) > 50  # the scan really sees the error messages
    bad = []
    for where, text in texts:
        for match in OPTION.finditer(text):
            if "pip install" in text[: match.start()]:
                continue  # an option of pip's, in an install hint
            option, dotted = match.groups()
            if option not in known or dotted:  # `--input.text_column` is no option
                bad.append(f"{where}: {match.group(0)}")
    assert not bad, bad


def test_every_recipe_key_a_hint_sets_exists() -> None:
    keys = _recipe_keys()
    bad = []
    for where, text in _error_texts():
        for match in SET_KEY.finditer(text):
            key = _normalise(match.group(1)).rstrip(".")
            if key not in keys:
                bad.append(f"{where}: {match.group(0)}")
    assert not bad, bad


def _hint(err: str) -> str:
    """The part of a one-line error after its last '; '."""
    return err.strip().rsplit("; ", 1)[-1]


@pytest.fixture(scope="module")
def classic_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished scikit-learn run on a two-class CSV with `text,label` columns (seconds)."""
    tmp = tmp_path_factory.mktemp("classic")
    words = ["bad awful", "good fine"]
    rows = "".join(f"{words[i % 2]} {i},{'ab'[i % 2]}\n" for i in range(40))
    data = write(tmp / "d.csv", "text,label\n" + rows)
    recipe = write(
        tmp / "r.yaml",
        f"model:\n  backbone: tfidf-logreg\ntasks:\n  - name: t\n    data: {data}\n",
    )
    assert main(["train", str(recipe), "--out", str(tmp / "run"), "--quiet"]) == 0
    return tmp / "run"


def test_eval_and_predict_hints_name_their_own_options(
    classic_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file whose columns differ from the run's: the hint names --text-column /
    --label-column, the parser takes them, and following the hint works."""
    other = write(tmp_path / "o.csv", "body,topic\nbad awful 1,a\ngood fine 2,b\n")
    subs = _subparsers(build_parser())
    for verb, argv in (
        ("predict", ["predict", str(classic_run), "--input", str(other)]),
        ("eval", ["eval", str(classic_run), "--data", str(other)]),
    ):
        followed = []
        code, _, err = run_cli(argv, capsys)
        while code == 2 and len(followed) < 3:
            hint = _hint(err)
            assert re.fullmatch(r"pass --[a-z-]+ NAME", hint), err
            option = hint.split()[1]
            assert option in _options(subs[verb]), err  # an option of this very command
            column = {"--text-column": "body", "--label-column": "topic"}[option]
            argv = [*argv, option, column]
            followed.append(option)
            code, _, err = run_cli(argv, capsys)
        assert code == 0, err  # following the hints works
        want = ["--text-column"] if verb == "predict" else ["--label-column", "--text-column"]
        assert followed == want


def test_train_hint_names_a_recipe_key_that_set_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write(tmp_path / "d.csv", "body,label\nhello,a\nworld,b\n")
    code, _, err = run_cli(["validate", "tiny", "--set", f"tasks.0.data={data}"], capsys)
    hint = _hint(err)
    assert code == 2 and hint == "set tasks[0].text_column", err
    key = hint.split()[1]
    assert _normalise(key) in _recipe_keys()
    dotted = key.replace("[", ".").replace("]", "")  # the --set spelling: tasks.0.text_column
    code, _, err = run_cli(
        ["validate", "tiny", "--schema-only", "--set", f"tasks.0.data={data}",
         "--set", f"{dotted}=body"], capsys)  # fmt: skip
    assert code == 0, err
