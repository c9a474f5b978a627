"""The import contracts `make lint` checks ([tool.importlinter] in pyproject.toml): they hold
on the sources, and they break on a lower layer importing a higher one or on a cycle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")

pytestmark = pytest.mark.skipif(
    not Path(LINT_IMPORTS).is_file(), reason="import-linter is not installed (dev extra)"
)


def _lint(src: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    config = str(ROOT / "pyproject.toml")
    return subprocess.run(
        [LINT_IMPORTS, config, "--no-cache"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip


def _copy(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "bitblend", src / "bitblend",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    return src


def test_the_layer_and_cycle_contracts_hold() -> None:
    res = _lint(ROOT / "src")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 kept, 0 broken" in res.stdout


def test_a_lower_layer_importing_a_higher_one_breaks_the_contract(tmp_path: Path) -> None:
    """config/ importing runs/ (even inside a function) fails both contracts."""
    src = _copy(tmp_path)
    with (src / "bitblend" / "config" / "classic.py").open("a") as f:
        f.write("\n\ndef _late() -> None:\n    from bitblend.runs.load import load_run  # noqa\n")
    res = _lint(src)
    assert res.returncode == 1
    assert "bitblend.config is not allowed to import bitblend.runs" in res.stdout


def test_a_cycle_inside_a_package_breaks_the_contract(tmp_path: Path) -> None:
    """runs/spec.py importing runs/load.py back (load.py imports spec.py) is a cycle the
    layers contract cannot see (one package); the acyclic contract does."""
    src = _copy(tmp_path)
    with (src / "bitblend" / "runs" / "spec.py").open("a") as f:
        f.write("\n\ndef _late() -> None:\n    from bitblend.runs.load import load_run  # noqa\n")
    res = _lint(src)
    assert res.returncode == 1
    assert "No cycles are allowed in bitblend.runs" in res.stdout
