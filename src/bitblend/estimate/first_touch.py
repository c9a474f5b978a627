"""What a growing process pays per page it touches first: the recycled pool of pages freed
lately, and the cold cost past it (estimate/probe.py measures it for the warm-up term)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bitblend.procmem import mem_available_bytes

PAGE = 4096
# A run grows by hundreds of MiB past its setup. In a VM whose host backs guest memory
# lazily, pages some process freed lately are still backed and cost ~2 us to fault in
# (a recycled pool of a few hundred MiB to a GiB or more after a large process exits);
# past that pool the host backs each page on first touch: ~25-30 us a page for one
# thread here, ~12-13 us of wall time when the run's 2 threads fault in parallel (steps 1-2
# of a MiniLM run: 190k faults, ~16 us each over the steady step). The probe fills fresh
# tensors with torch's threads, as an op's first write does, chunk after chunk (all held,
# so none reuses another's pages), until it is past the pool.
#
# The first dear chunk is often part pool (a chunk of 32 MiB read 6-24 us a page where the
# chunks after it read 26-45 and the pool's 2), so it is not priced: the probe prices the
# two dear chunks after it. One evening the pool was 1.15 GiB, and the run's page faults
# past it cost ~45 us of wall time each: the size cap is past that.
FAULT_CHUNK_BYTES = 32 * 2**20
FAULT_MAX_BYTES = 2 * 2**30  # stop here (or at a quarter of the memory available)
FAULT_BUDGET_S = 3.0  # or here: a machine without a dear first touch then reads warm
COLD = 3.0  # a chunk this many times the fastest one is past the recycled pool
PRICED = 2  # dear chunks priced, after the first dear one (the pool's edge)
EDGE = PRICED + 1  # dear chunks in a row: past the pool


@dataclass(frozen=True)
class FirstTouch:
    """Wall seconds per 4 KiB page a growing process pays: `cold` past the recycled pool,
    `warm` for recycled pages, whether the probe got past the pool (`found_cold`) and the
    bytes it touched before the dear pages (`pool_bytes`: all it touched where it met
    none, so a lower bound of the pool)."""

    cold: float
    warm: float
    found_cold: bool
    pool_bytes: int = 0


def first_touch(
    chunk_bytes: int = FAULT_CHUNK_BYTES,
    max_bytes: int | None = None,
    budget: float = FAULT_BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> FirstTouch:
    """Fill fresh `chunk_bytes` tensors (torch's threads, as ops write) until `1 + PRICED`
    chunks in a row (`EDGE`) read `COLD` times the fastest (past the recycled pool: `cold` is the
    mean of the last `PRICED`, the first being the pool's edge), or `max_bytes` (default
    FAULT_MAX_BYTES, at most a quarter of the memory available) / `budget` run out (then
    the slowest chunk: no pool was passed, on bare metal nothing is dear). Each chunk is
    its own anonymous mapping, so a tuned heap's free blocks (train/cpu_heap.py, in the
    same process) are never what it touches."""
    import mmap

    if max_bytes is None:
        available = mem_available_bytes()
        max_bytes = FAULT_MAX_BYTES if available is None else min(FAULT_MAX_BYTES, available // 4)
    pages = chunk_bytes // PAGE
    regions: list[mmap.mmap] = []
    costs: list[float] = []
    end = time.perf_counter() + budget
    try:
        while not costs or (len(regions) * chunk_bytes < max_bytes and time.perf_counter() < end):
            regions.append(mmap.mmap(-1, chunk_bytes))
            chunk = torch.frombuffer(regions[-1], dtype=torch.float32)
            t0 = clock()
            chunk.fill_(1.0)
            costs.append((clock() - t0) / pages)
            del chunk  # the mapping closes only once no tensor views it
            fast = min(costs)
            if len(costs) >= EDGE and min(costs[-EDGE:]) >= COLD * fast:
                pool = (len(costs) - EDGE) * chunk_bytes
                return FirstTouch(sum(costs[-PRICED:]) / PRICED, fast, True, pool)
    finally:
        for region in regions:
            region.close()
    return FirstTouch(max(costs), min(costs), False, len(costs) * chunk_bytes)
