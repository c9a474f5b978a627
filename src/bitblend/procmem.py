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

import resource
from pathlib import Path


def peak_rss_bytes() -> int:
    """Peak RSS of this process since its program started: /proc/self/status VmHWM, or
    ru_maxrss where there is no /proc (macOS reports it in bytes, Linux in KiB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    except (OSError, ValueError, IndexError):
        pass
    import sys

    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024
