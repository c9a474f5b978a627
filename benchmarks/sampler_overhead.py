"""Cost of the mixture and the sampler per training step, against a MiniLM step.

Five sources of 2k-20k examples, 10,000 steps: `Mixture.task_at` + `BatchSampler.next`
(homogeneous batches) and `Mixture.allocate` + `BatchSampler.take` (mixed batches), for
interleaved and random order. Prints microseconds per call and per step, and the share of
a typical MiniLM-L6 step on this machine (~0.8 s; target < 1%).

    .venv/bin/python benchmarks/sampler_overhead.py [--steps 10000] [--batch 32] [--step-s 0.8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bitblend.config.schema import MixingConfig
from bitblend.data.mixture import Mixture
from bitblend.data.sampler import BatchSampler

SIZES = [2225, 4936, 20000, 7613, 12001]
NAMES = ["bbc", "tweets", "news", "reuters", "reviews"]


def samplers(batch: int) -> list[BatchSampler]:
    """One length-grouped sampler per source, with text-like lengths."""
    rng = np.random.default_rng(0)
    return [BatchSampler(rng.integers(5, 129, n), batch, 0, i) for i, n in enumerate(SIZES)]


def homogeneous(cfg: MixingConfig, steps: int, batch: int) -> tuple[float, float]:
    """Seconds per task_at call and per next call."""
    mix, srcs = Mixture(cfg, NAMES, SIZES, 0, steps), samplers(batch)
    t0 = time.perf_counter()
    tasks = [mix.task_at(s) for s in range(steps)]
    t1 = time.perf_counter()
    for t in tasks:
        srcs[t].next()
    t2 = time.perf_counter()
    return (t1 - t0) / steps, (t2 - t1) / steps


def mixed(cfg: MixingConfig, steps: int, batch: int) -> tuple[float, float]:
    """Seconds per allocate call and per step's takes (one per task in the batch)."""
    mix, srcs = Mixture(cfg, NAMES, SIZES, 0, steps), samplers(batch)
    t0 = time.perf_counter()
    allocs = [mix.allocate(s, batch) for s in range(steps)]
    t1 = time.perf_counter()
    for counts in allocs:
        for i, k in enumerate(counts):
            if k:
                srcs[i].take(k)
    t2 = time.perf_counter()
    return (t1 - t0) / steps, (t2 - t1) / steps


def main() -> None:
    """Time every combination and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=32, help="examples per step")
    p.add_argument("--step-s", type=float, default=0.8, help="model step time to compare to")
    args = p.parse_args()
    print(f"{len(SIZES)} sources {SIZES}, {args.steps} steps, batch {args.batch}")
    print(f"{'batches':<12}{'strategy':<14}{'order':<13}{'mixture us':>11}{'sampler us':>11}"
          f"{'step us':>9}{'share':>9}")  # fmt: skip
    worst = 0.0
    for strategy in ("temperature", "dynamic", "round_robin"):
        for order in ("interleaved", "random"):
            cfg = MixingConfig(strategy=strategy, order=order)  # type: ignore[arg-type]
            for kind, fn in (("homogeneous", homogeneous), ("mixed", mixed)):
                mix_s, samp_s = fn(cfg, args.steps, args.batch)
                us = [x * 1e6 for x in (mix_s, samp_s, mix_s + samp_s)]
                share = (mix_s + samp_s) / args.step_s
                worst = max(worst, share)
                cells = "".join(f"{x:>11.1f}" for x in us[:2]) + f"{us[2]:>9.1f}{share:>9.4%}"
                print(f"{kind:<12}{strategy:<14}{order:<13}{cells}")
    verdict = "OK" if worst < 0.01 else "OVER"
    print(f"worst share of a {args.step_s} s step: {worst:.4%} (target < 1%): {verdict}")


if __name__ == "__main__":
    main()
