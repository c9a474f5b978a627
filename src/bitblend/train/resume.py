"""Checkpoint orchestration for the trainer: save with pruning, resume from the newest
intact checkpoint, and stopping cleanly on SIGTERM.

Kept apart from the loop so the loop reads `self.checkpoints.save(...)` /
`.restore(...)` and the recovery rules live in one place:
- saving prunes first when `keep_checkpoints` leaves room (a full disk then still has space
  for the new one), then saves atomically, then prunes to `keep`; the last intact
  checkpoint is never pruned;
- resuming first finishes what a killed process left (temp dirs, half-pruned dirs, a
  replacement cut between its renames), then loads the newest checkpoint that verifies,
  saying in one line which ones it skipped and why;
- SIGTERM (what schedulers send before they kill) sets a flag; the loop saves at the next
  step boundary and stops with a resume hint and exit code 143.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from bitblend.errors import BitblendError
from bitblend.train import checkpoint as ckpt
from bitblend.train.run_dir import clean_stale_temp

FINAL_EVAL = "final_eval"  # key of the final evaluation in the last checkpoint's state


class TrainingStopped(Exception):
    """Training stopped on a signal after saving; the CLI prints `message`, exits `code`."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def signal_name(signum: int) -> str:
    """SIGTERM for 15, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def resume_hint(run_dir: Path) -> str:
    """The command that continues this run."""
    return f"bitblend train --resume {run_dir}"


# -- SIGTERM -------------------------------------------------------------------------------
_stop: list[int] = []  # signal numbers received (a list: set from a signal handler)


def stop_requested() -> int | None:
    """The signal that asked training to stop, if one did."""
    return _stop[0] if _stop else None


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While active, SIGTERM asks the loop to save and stop instead of killing the process."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    _stop.clear()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: _stop.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop.clear()


# -- save / restore ----------------------------------------------------------------------
@dataclass
class Restored:
    """What a resume found: the step, and the final evaluation if that step had one."""

    step: int
    final_eval: dict[str, Any] | None


class Checkpointer:
    """The checkpoints of one run directory, as the trainer saves and restores them."""

    def __init__(self, run_dir: Path, keep: int, notice: Callable[[str], None]) -> None:
        self.run_dir = run_dir
        self.root = run_dir / "checkpoints"
        self.keep = keep
        self.notice = notice
        self.last_good: int | None = None  # a step known intact: just saved or just loaded

    def save(
        self,
        step: int,
        model: nn.Module,
        state: dict[str, Any],
        tensors: Callable[[str], bool] | None = None,
    ) -> Path:
        """Prune (leaving room), save atomically, prune to `keep`. `tensors`: which model
        keys to store (adapter runs: not the frozen base)."""
        if self.keep >= 2:
            ckpt.prune_checkpoints(self.root, self.keep - 1, known_good=self.last_good)
        path = ckpt.save_checkpoint(self.root, step, model, state, tensors)
        self.last_good = step
        ckpt.prune_checkpoints(self.root, self.keep, known_good=step)
        return path

    def restore(
        self,
        model: nn.Module,
        load_state: Callable[[dict[str, Any]], None],
        *,
        clean: bool = True,
        tensors: Callable[[str], bool] | None = None,
    ) -> Restored | None:
        """Clean up after a crash, then load the newest intact checkpoint (None: there is none).
        `clean=False` only loads (ranks other than 0 of a distributed run: rank 0 cleans).

        `load_state` restores everything but the weights; a checkpoint it rejects with a
        BitblendError (e.g. an optimizer state class outside the allow-list) counts as not
        intact, and so does one whose state does not fit this run.
        """
        for note in ckpt.clean_stale(self.root) + clean_stale_temp(self.run_dir) if clean else []:
            self.notice(note)
        found: dict[str, Any] = {}

        def load_one(path: Path) -> int:
            step, state = ckpt.load_checkpoint(path, model, tensors)
            if step != ckpt.step_of(path):
                raise ckpt.CorruptCheckpoint(f"{path}: step {step} in state.json")
            final_eval = state.pop(FINAL_EVAL, None)
            try:
                load_state(state)
            except BitblendError as exc:
                raise BitblendError(f"{path}: {exc}") from None
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise BitblendError(f"{path}: state does not fit this run ({exc!r})") from None
            found["final_eval"] = final_eval
            return step

        step = ckpt.load_newest_intact(self.root, load_one, self.notice)
        if step is None:
            return None
        self.last_good = step
        return Restored(step, found["final_eval"])
