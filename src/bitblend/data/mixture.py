"""Mixture strategies: which task each step trains (homogeneous batches), or how many
examples of each task a step's batch holds (mixed batches).

Target shares (n_i = task i's training examples, capped at `size_cap` when set):

- proportional: n_i / sum n.            - uniform: 1 / k.
- temperature: n_i^(1/T) / sum n^(1/T) (T=1 is proportional, T -> inf uniform; T5/seqio).
- weights: `mixing.weights[name]`, normalised to sum 1.
- round_robin: 1 / k, strictly cycling 0, 1, ..., k-1 (steps, or examples when mixed).
- sequential: task 0 for a contiguous block of steps, then task 1, ... in recipe order;
  task i's block is round(total_steps * cumshare_i) - round(total_steps * cumshare_{i-1})
  with proportional shares, so every task gets about the same number of epochs and the
  blocks add up to exactly `total_steps`. Steps past `total_steps` stay on the last task.
  Its target is 1 for the current block's task; the schedule is followed exactly.
- dynamic: starts at temperature shares. Every `dynamic_every` steps the trainer calls
  `observe` with each task's held-out loss L_i. With z_i = L_i / mean_j(L_j) - 1 (over the
  finite losses; a task without a finite loss keeps z_i = 0):
      w_i <- w_i * exp(eta * z_i),  w <- w / sum(w),  w <- (1 - k * floor) * w + floor
  (eta = `dynamic_eta`, floor = `dynamic_floor`): DoReMi's update, on held-out loss instead
  of excess loss over a reference model. Every share stays >= floor; equal losses only
  pull the weights toward uniform by the floor mix.

Orders. `interleaved` (deterministic): the cumulative target of task i after u units
(steps, or examples when mixed) is E_i(u) = sum of its target share over those units. Unit
u+1 goes, among the tasks behind their target (E_i(u+1) - count_i > 0), to the one whose
next unit falls due first (smallest u* with E_i(u*) = count_i + 1); ties -> lowest index.
This is earliest-deadline-first on Pfair windows: for fixed targets it keeps
|count_i - E_i(u)| < 1 for every task on every prefix, i.e. within one batch (homogeneous)
or one example (mixed). The plain largest-deficit rule does not: with 6 skewed shares it
falls 1.17 steps behind. `random`: each step's task is drawn from the targets by
np.random.default_rng([seed, salt, step]), and a mixed batch is a multinomial draw from the
same kind of generator: pure functions of (seed, step) and the (dynamic) weights.

Everything that a resumed run needs (counts, weights, the cumulative-target anchor) is in
`state_dict()`, as plain JSON-able lists and ints.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import numpy as np

from bitblend.config.schema import MixingConfig

# Salts keep the random-order generators of task choice and batch composition apart
# (and apart from the samplers, which are seeded by (seed, stream, epoch)).
TASK_SALT = 104729
BATCH_SALT = 130363


def base_shares(cfg: MixingConfig, names: list[str], sizes: list[int]) -> list[float]:
    """Initial target shares of a strategy (sum 1; sequential: block lengths)."""
    n = [min(s, cfg.size_cap) if cfg.size_cap else s for s in sizes]
    if cfg.strategy in ("proportional", "sequential"):
        w = [float(x) for x in n]
    elif cfg.strategy in ("temperature", "dynamic"):
        w = [float(x) ** (1.0 / cfg.temperature) for x in n]
    elif cfg.strategy == "weights":
        if cfg.weights is None or any(name not in cfg.weights for name in names):
            raise ValueError(f"mixing.weights: expected a weight for each of {names}")
        w = [float(cfg.weights[name]) for name in names]
    else:  # uniform, round_robin
        w = [1.0] * len(names)
    total = sum(w)
    if not total > 0 or any(x < 0 for x in w):
        raise ValueError(f"mixing: shares need sizes/weights >= 0 with a positive sum, got {w}")
    return [x / total for x in w]


def block_edges(shares: list[float], total_steps: int) -> list[int]:
    """sequential: the first step after each task's block (the last edge is total_steps)."""
    edges, cum = [], 0.0
    for s in shares:
        cum += s
        edges.append(min(total_steps, math.floor(cum * total_steps + 0.5)))
    edges[-1] = total_steps  # cumulative round-off must not lose a step
    return edges


class Mixture:
    """Targets, step-to-task assignment and mixed-batch allocation; resumable via state."""

    def __init__(
        self, cfg: MixingConfig, names: list[str], sizes: list[int], seed: int, total_steps: int
    ) -> None:
        if not names or len(names) != len(sizes):
            raise ValueError(f"mixture: {len(names)} names for {len(sizes)} sizes")
        self.cfg = cfg
        self.names = list(names)
        self.sizes = list(sizes)
        self.seed = seed
        self.total_steps = total_steps
        self.k = len(names)
        self.weights = base_shares(cfg, self.names, self.sizes)
        self.edges = block_edges(self.weights, total_steps)
        self.counts = [0] * self.k  # steps (homogeneous) or examples (mixed) per task
        self.steps = 0  # calls of task_at / allocate so far
        self.units = 0  # steps or examples handed out so far (sum of counts)
        # Cumulative target E_i at `anchor_units` units. Fixed targets keep the anchor at
        # 0; dynamic reweighting moves it so E stays continuous across a weight change.
        self.anchor = [0.0] * self.k
        self.anchor_units = 0

    # -- targets -------------------------------------------------------------------------
    def targets(self) -> list[float]:
        """Current target share of every task (sums to 1)."""
        if self.cfg.strategy == "sequential":
            cur = self._block(max(self.steps - 1, 0))  # the task of the latest step
            return [1.0 if i == cur else 0.0 for i in range(self.k)]
        return list(self.weights)

    def expected(self) -> list[float]:
        """Cumulative target units per task so far (sequential: its exact block schedule)."""
        if self.cfg.strategy == "sequential":
            return [float(c) for c in self.counts]
        u = self.units - self.anchor_units
        return [a + w * u for a, w in zip(self.anchor, self.weights, strict=True)]

    def realised(self) -> list[float]:
        """Share of steps (homogeneous) or examples (mixed) each task got so far."""
        total = sum(self.counts)
        return [c / total if total else 0.0 for c in self.counts]

    def _block(self, step: int) -> int:
        """sequential: the task whose block of steps contains `step`."""
        return min(bisect.bisect_right(self.edges, step), self.k - 1)

    # -- drawing -------------------------------------------------------------------------
    def task_at(self, step: int) -> int:
        """Task trained at `step` (homogeneous batches); call once per step, in order."""
        strategy = self.cfg.strategy
        if self.k == 1:
            task = 0
        elif strategy == "round_robin":
            task = step % self.k
        elif strategy == "sequential":
            task = self._block(step)
        elif self.cfg.order == "random":
            rng = np.random.default_rng([self.seed, TASK_SALT, step])
            task = int(rng.choice(self.k, p=self._probabilities()))
        else:
            # Interleaving is a function of the counts so far, so a skipped or repeated
            # step (e.g. a resume that did not restore this state) would silently diverge.
            if step != self.steps:
                raise ValueError(
                    f"mixture: task_at({step}) after {self.steps} steps; interleaved order "
                    "needs one call per step, in order (restore state_dict on resume)"
                )
            task = self._next_unit()
        self.counts[task] += 1
        self.units += 1
        self.steps += 1
        return task

    def allocate(self, step: int, batch: int) -> list[int]:
        """Examples of each task in this step's batch of `batch` examples (sums to `batch`)."""
        if batch < 0:
            raise ValueError(f"mixture: batch of {batch} examples")
        k, strategy = self.k, self.cfg.strategy
        if k == 1:
            out = [batch]
        elif strategy == "sequential":
            out = [0] * k
            out[self._block(step)] = batch
        elif strategy == "round_robin":
            # Example u of the run goes to task u % k.
            start, base, extra = self.units % k, batch // k, batch % k
            out = [base + (1 if (i - start) % k < extra else 0) for i in range(k)]
        elif self.cfg.order == "random":
            rng = np.random.default_rng([self.seed, BATCH_SALT, step])
            out = [int(x) for x in rng.multinomial(batch, self._probabilities())]
        else:
            # One example at a time, so the bound holds on every example prefix too.
            out = [0] * k
            for _ in range(batch):
                i = self._next_unit()
                out[i] += 1
                self.counts[i] += 1
                self.units += 1
            self.steps += 1
            return out
        for i, c in enumerate(out):
            self.counts[i] += c
        self.units += batch
        self.steps += 1
        return out

    def _probabilities(self) -> np.ndarray:
        p = np.asarray(self.weights, dtype=np.float64)
        return p / p.sum()  # exact normalisation: numpy rejects p that misses 1 by > 1e-8

    def _next_unit(self) -> int:
        """interleaved: earliest deadline among the tasks behind their target (module doc)."""
        u = self.units + 1 - self.anchor_units  # units since the anchor, this one included
        best, best_due = -1, math.inf
        best_lag, fallback = -math.inf, 0
        for i, (a, w, c) in enumerate(zip(self.anchor, self.weights, self.counts, strict=True)):
            lag = a + w * u - c  # how far behind its cumulative target task i would be
            if lag > best_lag:
                best_lag, fallback = lag, i
            if lag > 0 and w > 0:
                due = (c + 1 - a) / w  # units since the anchor at which E_i reaches c + 1
                if due < best_due:  # strict: ties keep the lowest index
                    best, best_due = i, due
        # Some lag is > 0 since the lags sum to 1; the fallback only guards float round-off.
        return best if best >= 0 else fallback

    # -- dynamic -------------------------------------------------------------------------
    def observe(self, step: int, heldout_losses: dict[int, float]) -> None:
        """dynamic: shift weight toward tasks whose held-out loss is high (module doc)."""
        if self.cfg.strategy != "dynamic":
            return
        finite = {
            i: float(v) for i, v in heldout_losses.items() if 0 <= i < self.k and math.isfinite(v)
        }
        mean = sum(finite.values()) / len(finite) if finite else 0.0
        if mean <= 0:  # nothing to compare against (no losses, or all zero)
            return
        # Keep the cumulative target continuous: what was due so far stays due.
        self.anchor = self.expected()
        self.anchor_units = self.units
        eta = self.cfg.dynamic_eta
        logits = [
            math.log(max(w, 1e-300)) + eta * (finite[i] / mean - 1.0 if i in finite else 0.0)
            for i, w in enumerate(self.weights)
        ]
        top = max(logits)  # softmax-style shift: exp never overflows
        w = [math.exp(x - top) for x in logits]
        total = sum(w)
        floor = min(self.cfg.dynamic_floor, 1.0 / self.k)
        self.weights = [(1.0 - self.k * floor) * x / total + floor for x in w]

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counts, weights and the target anchor: everything a resumed run needs."""
        return {
            "strategy": self.cfg.strategy,
            "names": list(self.names),
            "counts": list(self.counts),
            "weights": list(self.weights),
            "steps": self.steps,
            "units": self.units,
            "anchor": list(self.anchor),
            "anchor_units": self.anchor_units,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` (also reads the older counts/weights/steps form)."""
        names = state.get("names", self.names)
        if list(names) != self.names or len(state["counts"]) != self.k:
            raise ValueError(f"mixture state is for tasks {list(names)}, not {self.names}")
        strategy = state.get("strategy", self.cfg.strategy)
        if strategy != self.cfg.strategy:
            raise ValueError(f"mixture state is for strategy {strategy}, not {self.cfg.strategy}")
        self.counts = [int(c) for c in state["counts"]]
        self.weights = [float(w) for w in state["weights"]]
        self.steps = int(state["steps"])
        self.units = int(state.get("units", sum(self.counts)))
        self.anchor = [float(a) for a in state.get("anchor", [0.0] * self.k)]
        self.anchor_units = int(state.get("anchor_units", 0))


class TaskMixer:
    """Homogeneous random-order mixer of the first trainer, now a thin wrapper over Mixture."""

    def __init__(self, strategy: str, sizes: list[int], seed: int) -> None:
        if strategy not in ("proportional", "round_robin"):
            strategy = "uniform"  # what the first TaskMixer did with any other name
        cfg = MixingConfig(strategy=strategy, order="random")  # type: ignore[arg-type]
        self.strategy = strategy
        self.sizes = sizes
        self.seed = seed
        self.mixture = Mixture(cfg, [str(i) for i in range(len(sizes))], sizes, seed, 0)
        self.shares = self.mixture.targets()

    def task_at(self, step: int) -> int:
        """Index of the task trained at `step` (0-based)."""
        return self.mixture.task_at(step)
