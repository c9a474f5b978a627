"""Keep freed activation buffers in the process heap on CPU (glibc `mallopt`).

PyTorch has no caching allocator on CPU: every activation, gradient and temporary is a
`malloc`/`free`. glibc serves blocks above its mmap threshold (128 KiB at start, adapting
upward) with fresh `mmap`s and gives them back on `free`, and trims the heap top past
128 KiB, so a training step re-faults tens of MB of zeroed pages every time. Raising
the mmap threshold to its maximum (32 MiB on 64-bit) and the trim threshold keeps those
pages mapped between steps: MiniLM training steps run ~1.1x faster here (see
docs/benchmarks.md). The cost is resident memory: the heap stays at its high-water mark
instead of shrinking between steps, which is what a training process does anyway.

Blocks above 32 MiB (the cap glibc puts on the threshold) were still mmapped afresh on
every allocation: a causal LM's logits and their gradients (batch x sequence x vocabulary,
134 MiB each in fp32 for 8 x 512 x 8,192) re-faulted ~100k pages a step, each costing
~4.6 us in this VM (host-backed first touch), so a llama-30m step spent ~1.4 s of ~3.9 s
faulting. `M_MMAP_MAX = 0` turns glibc's per-block mmaps off: every block comes from the
heap and is reused from there (2.4 s a step, the faults gone after the heap's first few
steps; docs/benchmarks.md). Threads' arenas still map their 64 MiB heaps as before.

This is what Intel's and PyTorch's CPU performance guides get from preloading jemalloc or
tcmalloc, without a preload: `mallopt` takes effect at run time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

from bitblend.procmem import user_malloc_settings

# glibc <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper bound on 64-bit: 4 MiB * sizeof(long)
TRIM_THRESHOLD = 2**30
TOP_PAD = 64 * 2**20

_applied: dict[str, int] | None = None
_trim: Any = None  # glibc's malloc_trim, found with mallopt (release_free_pages)


def tune_cpu_heap() -> dict[str, int] | None:
    """Apply the settings once per process; returns them, or None where they do not apply
    (not Linux/glibc, or the user set MALLOC_* variables: theirs win)."""
    global _applied, _trim
    if _applied is not None:
        return _applied
    if not sys.platform.startswith("linux") or user_malloc_settings():
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _trim = getattr(libc, "malloc_trim", None)
    if _trim is not None:
        _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
    wanted = {
        "mmap_threshold": (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
        "trim_threshold": (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        "top_pad": (M_TOP_PAD, TOP_PAD),
        "mmap_max": (M_MMAP_MAX, 0),  # no block gets its own mapping (see the docstring)
    }
    # mallopt returns 1 on success, 0 when it rejects a value.
    _applied = {key: value for key, (param, value) in wanted.items() if mallopt(param, value)}
    return _applied


def release_free_pages() -> bool:
    """Give the pages of the heap's free blocks back to the system: glibc's `malloc_trim(0)`
    drops every whole free page inside the heap, not only its top. False (nothing done)
    where the settings are not applied.

    Why: with the settings above the heap keeps its high-water mark, and a phase whose
    blocks have other sizes than a training step's (an evaluation: 4x a step's rows by
    default, batches of every length) lays its own blocks out beside the step's holes, so
    the two layouts stack in RSS. Released at the phase's edges, each phase faults in
    only its own: a four-task mixture's run peaked at 1761 MiB instead of 1970 (2042
    with evaluation's old shortest-first order). The price is re-faulting what was given
    back, at every evaluation: ~120-300k pages (the evaluation's layout, then the steps'),
    1.2 s of a 5.4 s evaluation here, priced by the estimate's warm-up. Released only
    before the first evaluation, later steps and evaluations faulted nothing, but peak RSS
    moved from run to run by +-150 MiB (an own-vocabulary run: 1287-1599 MiB, against
    1279-1286 released at every evaluation; docs/estimate.md, sixth round)."""
    if not _applied or _trim is None:
        return False
    _trim(0)
    return True
