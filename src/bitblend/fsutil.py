"""File-system helpers every layer may use: the user's umask, atomic writes, disk errors.

`tempfile.mkstemp` / `mkdtemp` create 0600 files and 0700 directories whatever the umask;
anything bitblend renames into place is chmod-ed to what a plain `open()` would have made,
so a run directory is readable by whoever the user's umask lets read it.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
from collections import Counter
from pathlib import Path

from bitblend.errors import BitblendError

# errno -> what to tell the user; these are the disk's fault, not bitblend's or the input's.
DISK_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def umask() -> int:
    """The process umask, read without changing it (Linux); falls back to set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # not thread-safe, hence only a fallback
    os.umask(old)
    return old


def apply_umask(path: Path, directory: bool = False) -> None:
    """Give `path` the mode `open()` / `mkdir()` would have given it under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file atomically (temp file in the same directory + rename), umask honoured."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        apply_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_disk_error(exc: BaseException) -> bool:
    """Whether `exc` is the disk refusing a write (full, read-only, no permission)."""
    return isinstance(exc, OSError) and exc.errno in DISK_ERRNOS


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def disk_error(exc: OSError, what: str, where: Path, needed: int | None = None) -> BitblendError:
    """One line: what could not be written, why, how much it needed and how much is free."""
    reason = DISK_ERRNOS.get(exc.errno or 0, exc.strerror or str(exc))
    space = ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        probe = where if where.exists() else where.parent
        try:
            free = shutil.disk_usage(probe).free
            space = f" (needs about {_mb(needed)}, {_mb(free)} free)" if needed else ""
            space = space or f" ({_mb(free)} free)"
        except OSError:
            pass
    return BitblendError(f"{where}: could not write {what}: {reason}{space}")


# -- fault injection (crash trials) ----------------------------------------------------------
# benchmarks/crash_trials.py sets BITBLEND_CRASH_AT=<point>:<n> to SIGKILL the process the
# n-th time it passes <point> (e.g. between the two renames of a checkpoint replacement),
# moments a random timer almost never hits. Unset, this is one dict lookup per call.
_passes: Counter[str] = Counter()


def crash_due(name: str) -> bool:
    """Count a pass through point `name`; True on the pass BITBLEND_CRASH_AT=<name>:<n> names."""
    spec = os.environ.get("BITBLEND_CRASH_AT")
    if not spec:
        return False
    point, _, nth = spec.rpartition(":")
    if point != name:
        return False
    _passes[name] += 1
    return _passes[name] == int(nth)


def crash_now() -> None:
    """SIGKILL this process: no handler, no cleanup, as a power cut or the OOM killer."""
    os.kill(os.getpid(), signal.SIGKILL)


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL here if BITBLEND_CRASH_AT names this point and pass."""
    if crash_due(name):
        crash_now()
