"""One writer per run directory: an exclusive `flock` on `<run>/.bitblend.lock`.

The lock lives as long as the process holds the file open, so a process killed with -9
releases it (the kernel closes the file); a leftover lock file holds nothing. The holder
writes its PID (and host) into the file for the message a second writer gets.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from types import TracebackType

from bitblend.errors import BitblendError
from bitblend.fsutil import disk_error, is_disk_error
from bitblend.train.run_dir import LOCK_FILE


class RunLock:
    """`with RunLock(run_dir, "--out"):` — the exclusive right to write `run_dir`.

    Creates `run_dir` if needed; on release removes the lock file, and the directory too
    when this lock created it and nothing else was written (a run refused on bad input
    leaves nothing behind).
    """

    def __init__(self, run_dir: Path, flag: str) -> None:
        self.run_dir = run_dir
        self.flag = flag  # how the user named the directory: --out or --resume
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> RunLock:
        try:
            self._created = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._fd = self._acquire()
            os.ftruncate(self._fd, 0)
            os.write(self._fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError as exc:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if is_disk_error(exc):
                raise disk_error(exc, f"the run's lock file ({self.flag})", self.path) from None
            raise
        return self

    def _acquire(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise BitblendError(
                    f"{self.flag} {self.run_dir}: another bitblend train ({holder}) is "
                    "writing this run; wait for it to finish or stop it first"
                ) from None
            # The previous holder unlinks the file on release: if it did so between our
            # open() and flock(), we hold a lock on a file nobody else will see. Retry.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            pid, _, host = os.pread(fd, 256, 0).decode(errors="replace").strip().partition(" ")
        except OSError:
            pid, host = "", ""
        if not pid:
            return "pid unknown"
        return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is None:
            return
        # Unlinked while still held (see _acquire); on a read-only or vanished directory
        # it stays, harmless: the lock itself dies with the descriptor.
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._created:
            with contextlib.suppress(OSError):  # only succeeds when empty: nothing written
                self.run_dir.rmdir()
