"""This process's peak resident memory, as the kernel counts it for this program alone.

`getrusage(RUSAGE_SELF).ru_maxrss` is not that on Linux: exec keeps the larger of the
new program's and the old one's high-water mark, and Python's subprocess spawns with
vfork, whose "old program" is the parent. A child started by a process holding 825 MiB
read ru_maxrss 825 MiB while its own high-water (VmHWM) was 9 MiB. So `bitblend
estimate`'s runtime child read its parent's RSS (which grows with the data it loaded and
the page-fault probe's buffers), and a run launched from a large process (a notebook, a
benchmark driver) would report the launcher's peak as its own. VmHWM belongs to the
process's address space, which exec replaces.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
import sys
from pathlib import Path
from typing import Any


def _proc_kib(path: str, key: str) -> int | None:
    """Bytes of field `key` of a /proc file that counts in kB ("VmHWM:   123456 kB"), or
    None where there is no such file or field."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak RSS of this process since its program started: /proc/self/status VmHWM, or
    ru_maxrss where there is no /proc (macOS reports it in bytes, Linux in KiB)."""
    hwm = _proc_kib("/proc/self/status", "VmHWM")
    if hwm is not None:
        return hwm
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


def mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    return _proc_kib("/proc/meminfo", "MemAvailable")


def user_malloc_settings() -> bool:
    """Whether the user set glibc's malloc through MALLOC_* variables: theirs win over
    bitblend's heap settings (train/cpu_heap.py, and the estimate that prices them)."""
    return any(k.startswith("MALLOC_") for k in os.environ)


class MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (every arena summed)."""

    _fields_ = [
        (f, ctypes.c_size_t)
        for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                  "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


@functools.cache
def _mallinfo2() -> Any:
    """glibc's mallinfo2, loaded once; None where there is none (not Linux, musl, glibc
    before 2.33)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = MallInfo2
    return fn


def mallinfo() -> MallInfo2 | None:
    """glibc's heap statistics now (every arena), or None where they cannot be read."""
    fn = _mallinfo2()
    return None if fn is None else fn()


def malloc_live_bytes() -> int | None:
    """Bytes glibc's malloc has handed out and not had back (mallinfo2's uordblks plus its
    mmapped blocks, every arena), or None where there is no glibc 2.33+. torch's CPU
    tensors and its libraries' caches are malloc blocks, so a change of it is what a piece
    of code kept, whatever RSS the heap's layout makes of it."""
    info = mallinfo()
    return None if info is None else int(info.uordblks + info.hblkhd)
