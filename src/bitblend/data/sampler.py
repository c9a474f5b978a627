"""A resumable, length-grouped batch sampler: batch k of epoch e is a pure function of
(seed, stream, e, k), so a checkpoint needs only (epoch, cursor, offset) to continue exactly.

Distributed: every rank derives the same global batch and keeps its contiguous slice, so a
rank's indices are a pure function of (seed, stream, position, rank, world size), ranks
never overlap, and the global sequence does not depend on the world size.
"""

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
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch {batch_size}, rank {rank} of {world_size}: out of range")
        if batch_size % world_size:
            raise ValueError(f"batch {batch_size} is not divisible by {world_size} ranks")
        lengths = np.asarray(lengths)
        if len(lengths) < batch_size:
            raise ValueError(f"{len(lengths)} examples is fewer than one batch of {batch_size}")
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream
        self.group_by_length = group_by_length
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.cursor = 0  # index of the next batch within the epoch
        self.offset = 0  # examples of batch `cursor` already handed out by `take`
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

    def _advance(self) -> None:
        self.cursor += 1
        self.offset = 0
        if self.cursor == self.batches_per_epoch:
            self.epoch += 1
            self.cursor = 0

    def _rank_slice(self, batch: np.ndarray) -> np.ndarray:
        # Every rank derives the same global batch and keeps its own contiguous slice; a
        # copy, so a caller that edits it in place cannot corrupt the cached epoch.
        per = len(batch) // self.world_size
        return batch[self.rank * per : (self.rank + 1) * per].copy()

    def next(self) -> np.ndarray:
        """This rank's part of the next global batch of example indices."""
        if self.offset:
            self._advance()  # the rest of a batch partly taken by `take` is skipped, not reused
        batch = self.epoch_batches(self.epoch)[self.cursor]
        self._advance()
        return self._rank_slice(batch)

    def take(self, k: int) -> np.ndarray:
        """This rank's part of the stream's next `k` examples (mixed batches); may span epochs.

        `k` is global: the ranks together consume the next k examples and rank r keeps the
        r-th of `world_size` contiguous parts (sizes differ by at most one, so a rank may get
        none when k < world_size). Consumes the epoch's batches in order, so no example
        repeats within an epoch and the position stays (epoch, cursor, offset).
        """
        if k < 0:
            raise ValueError(f"take({k}): expected k >= 0")
        out: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
        need = k
        while need > 0:
            batch = self.epoch_batches(self.epoch)[self.cursor]
            part = batch[self.offset : self.offset + need]
            out.append(part)
            need -= len(part)
            self.offset += len(part)
            if self.offset == len(batch):
                self._advance()
        whole = np.concatenate(out)
        return np.array_split(whole, self.world_size)[self.rank].copy()

    def set_rank(self, rank: int, world_size: int) -> None:
        """Serve rank `rank` of `world_size` from here on (the position stays global)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of {world_size}: out of range")
        if self.batch_size % world_size:
            raise ValueError(f"batch {self.batch_size} is not divisible by {world_size} ranks")
        self.rank, self.world_size = rank, world_size

    @property
    def epochs_completed(self) -> float:
        """Epochs of this source seen so far (fractional)."""
        done = self.cursor * self.batch_size + self.offset
        return self.epoch + done / (self.batches_per_epoch * self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream (the rest is derived from the seed)."""
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "offset": self.offset,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position."""
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self.offset = int(state.get("offset", 0))
        self.seed = int(state["seed"])
        self._cache = None  # batches derived from an older (seed, epoch) are stale
