"""What a growing process pays per page it touches first: the recycled pool of pages freed
lately, and the cold cost past it (estimate/probe.py measures it for the warm-up term)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

PAGE = 4096
# A run grows by hundreds of MiB past its setup. In a VM whose host backs guest memory
# lazily, pages some process freed lately are still backed and cost ~2 us to fault in
# (a recycled pool of a few hundred MiB to a GiB or more after a large process exits);
# past that pool the host backs each page on first touch: ~25-30 us a page for one
# thread here, ~12-13 us of wall time when the run's 2 threads fault in parallel (steps 1-2
# of a MiniLM run: 190k faults, ~16 us each over the steady step). The probe fills fresh
# tensors with torch's threads, as an op's first write does, chunk after chunk (all held,
# so none reuses another's pages), until it is past the pool.
FAULT_CHUNK_BYTES = 32 * 2**20
FAULT_MAX_BYTES = 2**30  # stop here: a machine without a dear first touch reads warm
FAULT_BUDGET_S = 1.5  # or here
COLD = 3.0  # a chunk this many times the fastest one is past the recycled pool


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
    max_bytes: int = FAULT_MAX_BYTES,
    budget: float = FAULT_BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> FirstTouch:
    """Fill fresh `chunk_bytes` tensors (torch's threads, as ops write) until two chunks in a
    row read `COLD` times the fastest (past the recycled pool: their mean is `cold`), or
    `max_bytes` / `budget` run out (then the slowest chunk: no pool was passed, on bare
    metal nothing is dear). Each chunk is its own anonymous mapping, so a tuned heap's
    free blocks (train/cpu_heap.py, in the same process) are never what it touches."""
    import mmap

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
            if len(costs) >= 2 and min(costs[-2:]) >= COLD * fast:
                pool = (len(costs) - 2) * chunk_bytes
                return FirstTouch(sum(costs[-2:]) / 2, fast, True, pool)
    finally:
        for region in regions:
            region.close()
    return FirstTouch(max(costs), min(costs), False, len(costs) * chunk_bytes)
