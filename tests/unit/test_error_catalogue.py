"""Every catalogued bad input, through the real CLI: exit 2, one line, no traceback, nothing on
disk changed, and exactly the message docs/errors.md shows (regenerate the page with
`python benchmarks/errors_doc.py` when a message changes on purpose)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.error_catalogue import CASES, DOC, PREFIX, Case, parse, prepare_run, render, run_case

DOCUMENTED = parse(DOC.read_text()) if DOC.is_file() else {}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # main() sets these itself with setdefault; set them here so they are undone afterwards.
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        monkeypatch.setenv(key, "1")


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny finished run (2 steps, a few seconds) for every case that reads a run."""
    return prepare_run(tmp_path_factory.mktemp("catalogue") / "run")


def _param(case: Case) -> object:
    return pytest.param(case, id=case.id, marks=[pytest.mark.slow] if case.slow else [])


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_case(case: Case, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    run = request.getfixturevalue("shared_run") if case.needs_run else None
    o = run_case(case, tmp_path, run)
    assert o.code == 2, o.err
    assert "Traceback" not in o.err
    assert len(o.err.splitlines()) == 1 and o.err.endswith("\n"), o.err
    assert o.message.startswith(PREFIX), o.err
    changed = sorted({k for k, _ in set(o.before.items()) ^ set(o.after.items())})
    assert not changed, f"files created, changed or removed: {changed[:5]}"
    assert o.message == DOCUMENTED.get(case.id), (
        f"docs/errors.md shows {DOCUMENTED.get(case.id)!r}; regenerate it with "
        "`python benchmarks/errors_doc.py` if the new message is meant"
    )


def test_page_lists_exactly_the_cases() -> None:
    """docs/errors.md is the case table rendered (ids, sections, descriptions, commands)."""
    assert [c.id for c in CASES] == list(DOCUMENTED), "regenerate docs/errors.md"
    assert len({c.id for c in CASES}) == len(CASES)
    assert DOC.read_text() == render(DOCUMENTED), "regenerate docs/errors.md"


def test_catalogue_size() -> None:
    # The issue asked for at least 60 cases: the 53 that already worked plus the new ones.
    assert len(CASES) >= 60
