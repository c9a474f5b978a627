"""Metric sinks: metrics.jsonl always, TensorBoard scalars when tensorboard is installed."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bitblend.errors import BitblendError
from bitblend.fsutil import crash_due, crash_now, disk_error, is_disk_error, write_atomic


def _clean(value: Any) -> Any:
    # JSON has no inf/nan: write them as strings so every line stays parseable.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class JsonlSink:
    """Appends one JSON object per record to metrics.jsonl, flushed at once.

    A full or read-only disk is a one-line BitblendError; a line it cut short is dropped
    (with a notice) by `truncate_jsonl` when the run resumes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fh = path.open("a", encoding="utf-8")
        except OSError as exc:
            if is_disk_error(exc):
                raise disk_error(exc, "metrics", path) from None
            raise

    def write(self, record: dict[str, Any]) -> None:
        """Append a record."""
        line = json.dumps(_clean(record)) + "\n"
        try:
            if crash_due("metrics:torn"):  # crash trials: die half way through a line
                self._fh.write(line[: len(line) // 2])
                self._fh.flush()
                crash_now()
            self._fh.write(line)
            self._fh.flush()
        except OSError as exc:
            if is_disk_error(exc):
                raise disk_error(exc, "metrics", self.path, len(line)) from None
            raise

    def close(self) -> None:
        """Close the file."""
        try:
            self._fh.close()
        except OSError as exc:
            if is_disk_error(exc):
                raise disk_error(exc, "metrics", self.path) from None
            raise


def truncate_jsonl(
    path: Path,
    last_step: int,
    *,
    keep_eval_at_last: bool = True,
    notice: Callable[[str], None] = lambda _: None,
) -> None:
    """Drop records after `last_step` (a resumed run redoes them), atomically.

    With `keep_eval_at_last=False` the eval records of `last_step` go too (the run will
    evaluate that step again). A last line cut short by a crash is dropped with a notice;
    any other line that is not JSON is an error naming it.
    """
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept: list[str] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec.get("step", 0))
        except (ValueError, TypeError, AttributeError):
            if i == len(lines):
                notice(f"{path.name}: dropped line {i}, cut short by a crash")
                continue
            raise BitblendError(
                f"{path}: line {i} is not a JSON record; fix or delete that line and resume"
            ) from None
        if step < last_step or (
            step == last_step and (keep_eval_at_last or rec.get("split") != "eval")
        ):
            kept.append(line)
    text = "".join(line + "\n" for line in kept)
    if text != path.read_text(encoding="utf-8", errors="replace"):
        try:
            write_atomic(path, text)
        except OSError as exc:
            if is_disk_error(exc):
                raise disk_error(exc, "metrics", path, len(text)) from None
            raise


def _quiet_writer_thread_disk_errors() -> None:
    """Keep tensorboard's writer thread from printing a traceback on a full disk.

    The thread stores the error and re-raises it in the main thread on the next write,
    where `TensorBoardSink` turns it into one line; the thread's own traceback would only
    bury that line. Other exceptions, and other threads, go to the previous hook.
    """
    previous = threading.excepthook
    if getattr(previous, "_bitblend", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        exc = args.exc_value
        if type(args.thread).__name__ == "_AsyncWriterThread" and exc and is_disk_error(exc):
            return
        previous(args)

    hook._bitblend = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class TensorBoardSink:
    """Scalars under `tb/`; a no-op when tensorboard is not installed."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        """`purge_step`: on resume, the first step to redo; TensorBoard hides older events
        at and after it, so a resumed run shows each step once."""
        self.log_dir = log_dir
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            self._writer = None
            return
        _quiet_writer_thread_disk_errors()
        try:
            self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        except OSError as exc:
            if is_disk_error(exc):
                raise disk_error(exc, "TensorBoard events", log_dir) from None
            raise

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
        try:  # the event writer runs in a thread; its disk errors surface on the next call
            for key, value in record.items():
                if key in ("step", "task", "split") or isinstance(value, bool):
                    continue
                if isinstance(value, int | float) and value is not None:
                    self._writer.add_scalar(f"{prefix}/{key}", value, step)
        except OSError as exc:
            if is_disk_error(exc):
                raise disk_error(exc, "TensorBoard events", self.log_dir) from None
            raise

    def close(self) -> None:
        """Flush and close."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except OSError as exc:
                if is_disk_error(exc):
                    raise disk_error(exc, "TensorBoard events", self.log_dir) from None
                raise
