"""A resumable, length-grouped batch sampler: batch k of epoch e is a pure function of
(seed, stream, e, k), so a checkpoint needs only (epoch, cursor) to continue exactly."""

from __future__ import annotations

from typing import Any

import numpy as np

# Examples are sorted by length inside windows of this many batches: close lengths share a
# batch (little padding) while the order across windows stays random.
MEGABATCH = 50


class BatchSampler:
    """Endless global batches over one source; each epoch is a fresh seeded permutation.

    Within an epoch no example repeats; the last incomplete batch of an epoch is dropped
    (a different remainder each epoch), so every batch has exactly `batch_size` examples.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        seed: int,
        stream: int,
        group_by_length: bool = True,
    ) -> None:
        if len(lengths) < batch_size:
            raise ValueError(f"{len(lengths)} examples is fewer than one batch of {batch_size}")
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream
        self.group_by_length = group_by_length
        self.epoch = 0
        self.cursor = 0  # index of the next batch within the epoch
        self._cache: tuple[int, list[np.ndarray]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Full batches in one epoch."""
        return len(self.lengths) // self.batch_size

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """All batches (arrays of example indices) of `epoch`, deterministically."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, self.stream, epoch])
        order = rng.permutation(len(self.lengths))
        usable = self.batches_per_epoch * self.batch_size
        order = order[:usable]
        if self.group_by_length:
            window = MEGABATCH * self.batch_size
            chunks = []
            for start in range(0, usable, window):
                chunk = order[start : start + window]
                # Stable sort, longest first, so ties keep the random order.
                chunks.append(chunk[np.argsort(-self.lengths[chunk], kind="stable")])
            order = np.concatenate(chunks)
        batches = [order[i : i + self.batch_size] for i in range(0, usable, self.batch_size)]
        if self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def next(self) -> np.ndarray:
        """The next global batch of example indices."""
        batches = self.epoch_batches(self.epoch)
        batch = batches[self.cursor]
        self.cursor += 1
        if self.cursor == len(batches):
            self.epoch += 1
            self.cursor = 0
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream (the rest is derived from the seed)."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position."""
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self.seed = int(state["seed"])
