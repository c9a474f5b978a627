"""Metric sinks: metrics.jsonl always, TensorBoard scalars when tensorboard is installed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    # JSON has no inf/nan: write them as strings so every line stays parseable.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class JsonlSink:
    """Appends one JSON object per record to metrics.jsonl, flushed at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append a record."""
        self._fh.write(json.dumps(_clean(record)) + "\n")
        self._fh.flush()

    def close(self) -> None:
        """Close the file."""
        self._fh.close()


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (they will be redone by a resumed run)."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= last_step
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class TensorBoardSink:
    """Scalars under `tb/`; a no-op when tensorboard is not installed."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            self._writer = None
            return
        self._writer = SummaryWriter(log_dir=str(log_dir))

    @property
    def enabled(self) -> bool:
        """Whether scalars are being written."""
        return self._writer is not None

    def write(self, record: dict[str, Any]) -> None:
        """Log every numeric field of a record as `<split>/<task>/<field>`."""
        if self._writer is None:
            return
        step = int(record.get("step", 0))
        prefix = f"{record.get('split', 'train')}/{record.get('task', 'all')}"
        for key, value in record.items():
            if key in ("step", "task", "split") or isinstance(value, bool):
                continue
            if isinstance(value, int | float) and value is not None:
                self._writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        """Flush and close."""
        if self._writer is not None:
            self._writer.close()
