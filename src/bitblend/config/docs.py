"""docs/recipes.md, generated from the schema so the reference never drifts from the code."""

from __future__ import annotations

from bitblend.config.load import field_docs

HEADER = """# Recipe reference

Every key a recipe may hold, with its default. Generated from the typed schema
(`src/bitblend/config/schema.py`) by `bitblend recipes --fields --markdown`; a test checks
that this file matches. Unknown keys, wrong types and bad enum values are errors that name
the path, e.g. `tasks[0].head: expected one of classification, regression, got 'clf'`.
Override any key from the command line: `--set train.steps=20`, `--set tasks.0.weight=2`.

| key | default | meaning |
|---|---|---|
"""


def fields_markdown() -> str:
    """The recipe reference as a Markdown table."""
    rows = [
        f"| `{key}` | `{default}` | {text.replace('|', '/')} |"
        for key, default, text in field_docs()
    ]
    return HEADER + "\n".join(rows) + "\n"
