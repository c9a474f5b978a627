"""Which task a step trains on: a pure function of (strategy, seed, step).

#3 adds temperature, explicit weights, sequential and dynamic strategies; the stateless
form means resume needs nothing beyond the step counter.
"""

from __future__ import annotations

import numpy as np


class TaskMixer:
    """Homogeneous batches: each optimizer step draws one task."""

    def __init__(self, strategy: str, sizes: list[int], seed: int) -> None:
        self.strategy = strategy
        self.sizes = sizes
        self.seed = seed
        k = len(sizes)
        if strategy == "proportional":
            total = float(sum(sizes))
            self.shares = [s / total for s in sizes]
        else:  # uniform and round_robin both aim at equal shares
            self.shares = [1.0 / k] * k

    def task_at(self, step: int) -> int:
        """Index of the task trained at `step` (0-based)."""
        if len(self.sizes) == 1:
            return 0
        if self.strategy == "round_robin":
            return step % len(self.sizes)
        rng = np.random.default_rng([self.seed, 104729, step])
        return int(rng.choice(len(self.sizes), p=self.shares))
