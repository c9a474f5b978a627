"""User docs that are generated from code must match it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from bitblend.config.docs import fields_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_recipe_reference_matches_schema() -> None:
    """docs/recipes.md is `bitblend recipes --fields --markdown` (regenerate it if not)."""
    assert (ROOT / "docs" / "recipes.md").read_text() == fields_markdown()


def _dry_run(target: str) -> list[str]:
    """The commands `make TARGET` would run (make -n: nothing is executed)."""
    argv = ["make", "-n", "--no-print-directory", "-C", str(ROOT), target]
    env = {**os.environ, "VENV": ".venv"}
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 0, f"make {target}: {proc.stderr}"
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def _pytest_args(lines: list[str]) -> list[str]:
    runs = [shlex.split(x) for x in lines if " -m pytest" in x]
    assert len(runs) == 1, lines
    return runs[0][runs[0].index("pytest") + 1 :]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_readme_commands_are_makefile_targets_that_do_what_it_says() -> None:
    """Every `make X` the README names is a target; demo trains the default recipe, test
    runs the whole suite, test-fast the unit tier, and CI (.ci/run) runs `make test`."""
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"`?make ([a-z][a-z-]*)", readme))
    assert {"demo", "test", "test-fast", "test-floors"} <= named
    for target in named:
        _dry_run(target)  # exists (make -n fails on an unknown target)
    # demo: `bitblend train` with no recipe argument, i.e. the built-in demo recipe.
    exe, *args = shlex.split(_dry_run("demo")[-1])
    assert Path(exe).name == "bitblend" and args == ["train"]
    # test: pytest on everything (no marker filter, no path narrowing; reporting flags ok).
    narrowing = [
        a for a in _pytest_args(_dry_run("test")) if a != "-q" and not a.startswith("--durations")
    ]
    assert narrowing == []
    fast = _pytest_args(_dry_run("test-fast"))
    assert fast[fast.index("-m") + 1] == "not slow and not multiproc"
    assert "make test" in readme and "make test-fast" in readme
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "make test" in [line.strip() for line in ci]
