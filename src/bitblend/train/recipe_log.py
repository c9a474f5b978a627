"""The run's record of its recipe: `recipe.yaml` (always the resolved recipe the run is
now following) and `recipe_history.jsonl` (one line per start or resume: when, at which
step, with which `--set` overrides, what changed and the schedule horizon in force)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from bitblend.config.load import dump_recipe
from bitblend.config.schema import Recipe

HISTORY_FILE = "recipe_history.jsonl"


def _replace_text(path: Path, text: str) -> None:
    """Write `path` atomically: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def record_recipe(
    run_dir: Path,
    recipe: Recipe,
    *,
    event: str,
    step: int,
    overrides: list[str],
    changed: dict[str, list[Any]] | None = None,
    plan_steps: int | None = None,
) -> None:
    """Rewrite recipe.yaml with `recipe` and append one line to recipe_history.jsonl."""
    _replace_text(run_dir / "recipe.yaml", dump_recipe(recipe))
    entry: dict[str, Any] = {
        "event": event,  # start | resume
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "overrides": list(overrides),
        "changed": changed or {},
        "train_steps": recipe.train.steps,
        # The horizon the LR schedule and the mixture follow (fixed when the run started).
        "plan_steps": plan_steps if plan_steps is not None else recipe.train.steps,
    }
    with (run_dir / HISTORY_FILE).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The entries of recipe_history.jsonl, oldest first ([] for runs older than it)."""
    path = run_dir / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
