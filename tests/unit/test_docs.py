"""User docs that are generated from code must match it."""

from __future__ import annotations

from pathlib import Path

from bitblend.config.docs import fields_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_recipe_reference_matches_schema() -> None:
    """docs/recipes.md is `bitblend recipes --fields --markdown` (regenerate it if not)."""
    assert (ROOT / "docs" / "recipes.md").read_text() == fields_markdown()


def test_readme_shows_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text
