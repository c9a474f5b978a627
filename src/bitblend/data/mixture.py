"""Mixture strategies: which task each step trains (homogeneous batches), or how many
examples of each task a mixed batch holds.

Target shares per strategy (n_i = task i's training examples, capped at `size_cap`):
proportional n_i / sum n; uniform 1/k; temperature n_i^(1/T) / sum n^(1/T); weights from the
recipe; round_robin equal, strictly cycling; sequential one task after another in blocks
proportional to n_i; dynamic starts at temperature shares and is reweighted by held-out loss.

Order `interleaved` is deterministic: step s goes to the task with the largest deficit
target_i * (s + 1) - count_i, so on every prefix each task's realised count stays within
one batch of target x steps. Order `random` draws the task from the targets with a
generator seeded by (seed, step): a pure function, no hidden state.

Dynamic reweighting (DoReMi/ODM-like, on held-out loss instead of excess loss over a
reference model): every `dynamic_every` steps the trainer calls `observe` with each task's
held-out loss L_i; with z_i = L_i / mean(L), w_i <- w_i * exp(eta * (z_i - 1)), renormalised,
then mixed with the floor: w <- (1 - k * floor) * w + floor, so no task starves.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bitblend.config.schema import MixingConfig


class Mixture:
    """Targets, step-to-task assignment and mixed-batch allocation; resumable via state."""

    def __init__(
        self, cfg: MixingConfig, names: list[str], sizes: list[int], seed: int, total_steps: int
    ) -> None:
        self.cfg = cfg
        self.names = names
        self.sizes = sizes
        self.seed = seed
        self.total_steps = total_steps
        self.k = len(names)
        self.weights = self._initial()
        self.counts = [0] * self.k  # steps (homogeneous) or examples (mixed) per task
        self.steps = 0

    def _initial(self) -> list[float]:
        cfg, k = self.cfg, self.k
        n = [min(s, cfg.size_cap) if cfg.size_cap else s for s in self.sizes]
        if cfg.strategy in ("proportional", "sequential"):
            w = [float(x) for x in n]
        elif cfg.strategy in ("temperature", "dynamic"):
            w = [float(x) ** (1.0 / cfg.temperature) for x in n]
        elif cfg.strategy == "weights":
            assert cfg.weights is not None  # validated with the recipe
            w = [float(cfg.weights[name]) for name in self.names]
        else:  # uniform, round_robin
            w = [1.0] * k
        total = sum(w)
        return [x / total for x in w]

    def targets(self) -> list[float]:
        """Current target share of every task (sums to 1)."""
        if self.cfg.strategy == "sequential":
            cur = self._block(self.steps)
            return [1.0 if i == cur else 0.0 for i in range(self.k)]
        return list(self.weights)

    def _block(self, step: int) -> int:
        """sequential: the task whose block of steps contains `step`."""
        edge = 0.0
        for i, w in enumerate(self.weights):
            edge += w * self.total_steps
            if step < round(edge):
                return i
        return self.k - 1

    def task_at(self, step: int) -> int:
        """Task trained at `step` (homogeneous batches); call once per step, in order."""
        if self.k == 1:
            task = 0
        elif self.cfg.strategy == "round_robin":
            task = step % self.k
        elif self.cfg.strategy == "sequential":
            task = self._block(step)
        elif self.cfg.order == "random":
            rng = np.random.default_rng([self.seed, 104729, step])
            task = int(rng.choice(self.k, p=np.asarray(self.weights) / sum(self.weights)))
        else:
            deficit = [
                w * (self.steps + 1) - c for w, c in zip(self.weights, self.counts, strict=True)
            ]
            task = int(np.argmax(deficit))  # first maximum: ties go to the lower index
        self.counts[task] += 1
        self.steps += 1
        return task

    def allocate(self, step: int, batch: int) -> list[int]:
        """Examples of each task in a mixed batch of `batch` examples (sums to `batch`)."""
        if self.cfg.strategy == "sequential":
            out = [0] * self.k
            out[self._block(step)] = batch
        elif self.cfg.strategy == "round_robin" or self.cfg.order == "interleaved":
            # Largest deficit first, one example at a time: cumulative counts stay within
            # one example of target x examples seen.
            total = sum(self.counts)
            out = [0] * self.k
            for j in range(batch):
                deficit = [
                    w * (total + j + 1) - (c + o)
                    for w, c, o in zip(self.weights, self.counts, out, strict=True)
                ]
                out[int(np.argmax(deficit))] += 1
        else:
            rng = np.random.default_rng([self.seed, 130363, step])
            out = rng.multinomial(batch, np.asarray(self.weights) / sum(self.weights)).tolist()
        for i, c in enumerate(out):
            self.counts[i] += c
        self.steps += 1
        return out

    def observe(self, step: int, heldout_losses: dict[int, float]) -> None:
        """dynamic: shift weight toward tasks whose held-out loss is high (see module doc)."""
        if self.cfg.strategy != "dynamic" or not heldout_losses:
            return
        mean = sum(heldout_losses.values()) / len(heldout_losses)
        w = list(self.weights)
        for i, loss in heldout_losses.items():
            if math.isfinite(loss) and mean > 0:
                w[i] *= math.exp(self.cfg.dynamic_eta * (loss / mean - 1.0))
        total = sum(w)
        floor = self.cfg.dynamic_floor
        self.weights = [(1 - self.k * floor) * x / total + floor for x in w]

    def realised(self) -> list[float]:
        """Share of steps (homogeneous) or examples (mixed) each task got so far."""
        total = sum(self.counts)
        return [c / total if total else 0.0 for c in self.counts]

    def state_dict(self) -> dict[str, Any]:
        """Counts and (dynamic) weights: everything a resumed run needs."""
        return {"counts": list(self.counts), "weights": list(self.weights), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`."""
        self.counts = [int(c) for c in state["counts"]]
        self.weights = [float(w) for w in state["weights"]]
        self.steps = int(state["steps"])
