"""The run directory: created only once a run is known to be valid, never overwritten."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bitblend.errors import BitblendError
from bitblend.fsutil import write_atomic

LOCK_FILE = ".bitblend.lock"  # train/lock.py; a leftover one (kill -9) holds nothing


def default_run_dir(recipe_name: str) -> Path:
    """runs/<recipe>-<YYYYmmdd-HHMMSS> under the current directory."""
    return Path("runs") / f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_new_run_dir(path: Path) -> None:
    """Refuse a directory that already holds files: a new run never overwrites one.

    One with a lock file may be a run being written right now: RunLock names its holder
    (and this check runs again under the lock).
    """
    if (path / LOCK_FILE).exists():
        return
    if path.exists() and (not path.is_dir() or any(p.name != LOCK_FILE for p in path.iterdir())):
        raise BitblendError(
            f"--out {path}: already exists and is not empty; choose another --out or "
            f"continue it with --resume {path}"
        )


def check_resume_dir(path: Path) -> None:
    """A run directory that can be resumed: it has recipe.yaml."""
    if not (path / "recipe.yaml").is_file():
        raise BitblendError(f"--resume {path}: not a bitblend run directory (no recipe.yaml)")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename, umask honoured): never half a file."""
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def clean_stale_temp(run_dir: Path) -> list[str]:
    """Delete `.tmp-*` files a killed process left in the run directory; returns notices."""
    notes = []
    for p in sorted(run_dir.glob(".tmp-*")) if run_dir.is_dir() else []:
        if p.is_file():
            p.unlink(missing_ok=True)
            notes.append(f"removed {p.name} (left by an interrupted write)")
    return notes
