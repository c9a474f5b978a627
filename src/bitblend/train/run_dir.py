"""The run directory: created only once a run is known to be valid, never overwritten."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bitblend.errors import BitblendError


def default_run_dir(recipe_name: str) -> Path:
    """runs/<recipe>-<YYYYmmdd-HHMMSS> under the current directory."""
    return Path("runs") / f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_new_run_dir(path: Path) -> None:
    """Refuse a directory that already holds files: a new run never overwrites one."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise BitblendError(
            f"--out {path}: already exists and is not empty; choose another --out or "
            f"continue it with --resume {path}"
        )


def check_resume_dir(path: Path) -> None:
    """A run directory that can be resumed: it has recipe.yaml."""
    if not (path / "recipe.yaml").is_file():
        raise BitblendError(f"--resume {path}: not a bitblend run directory (no recipe.yaml)")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
