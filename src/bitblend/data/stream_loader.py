"""A streamed task's batches: rows read and tokenised ahead of the step, off the training
thread, by DataLoader worker processes (or one background thread), split by rank and worker.

Split. Rank r of W keeps the stream's good rows g = r, r + W, r + 2W, ... (its j-th row is
g = jW + r); inside a rank, worker k of K keeps local rows j = j0 + k, j0 + k + K, ... A
DataLoader over an IterableDataset hands out its workers' items round robin, so the rank
receives j0, j0 + 1, ... in order: no duplicates, no gaps, the same rows as one process.

Position. `StreamSampler` counts the global rows consumed by all ranks together (`consumed`,
the same on every rank after every step) and keeps the cursor of the last row this rank took.
A resume restarts every rank's reader after rank 0's cursor and drops rows below `consumed`,
so it reads exactly what the uninterrupted run would have read next.

Packing (`tasks[i].packing`, data/packing.py). A packed task's rows are packed rows, not
documents: every rank reads and tokenises *every* document (its workers split them, the
d-th document read to worker d mod K), feeds them in order to its own `Packer` on the
training thread (list slicing only) and keeps the packed rows P = r, r + W, ... So the
packed stream is the in-memory packer's rows over the same documents whatever the number
of ranks and workers (the price: each rank tokenises the whole stream). Every `take` feeds
documents until the global batch's last row is complete, so all ranks end a step in the
same state; the checkpoint holds the last document's cursor, the packer's partial row and
the full rows completed beyond the batch (a long document fills several), and a resume
continues filling that partial row: the same tokens, bit for bit.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bitblend.data.modalities import EncodedSplit, encode_documents, encode_texts, pack_eos
from bitblend.data.packing import Packer
from bitblend.data.streaming import Cursor, StreamSource
from bitblend.errors import BitblendError

CHUNK = 64  # rows a worker tokenises in one call (one tokenizer call per row is slow)
PREFETCH = 4  # items queued per worker (DataLoader prefetch_factor) or chunks (thread)


@dataclass
class Item:
    """One tokenised row (or, with `error` set, the one-line error that ended the stream)."""

    g: int = -1
    cursor: list[int] | None = None
    ids: list[int] | None = None
    skipped: int = 0
    note: str | None = None
    error: str | None = None


@dataclass
class StreamedSplit(EncodedSplit):
    """The rows of the latest batch of a streamed task; `len` is the stream's estimated
    rows per epoch (what mixing shares and `train.epochs` are computed from)."""

    estimate: int = 0

    def __len__(self) -> int:
        return self.estimate


class ConsumerRows(torch.utils.data.IterableDataset[Item]):
    """The tokenised rows of one rank (and, in a DataLoader, of one worker) of a stream."""

    def __init__(
        self,
        source: StreamSource,
        tokenizer: Any,
        max_length: int,
        after: Cursor | None,
        skipped: int,
        first_g: int,
        rank: int,
        world: int,
        packed: bool = False,
    ) -> None:
        self.source, self.tokenizer, self.max_length = source, tokenizer, max_length
        self.after, self.skipped, self.first_g = after, skipped, first_g
        self.rank, self.world = rank, world
        # Packed: every document from first_g on, whole (the rank's packer splits rows).
        self.packed = packed
        if packed:
            self.rank, self.world = 0, 1

    def __iter__(self) -> Iterator[Item]:
        info = torch.utils.data.get_worker_info()
        k, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        j0 = -(-(self.first_g - self.rank) // self.world)  # this rank's first row at >= first_g
        pending: list[Any] = []
        try:
            for r in self.source.rows(self.after, self.skipped):
                if r.g < self.first_g or (r.g - self.rank) % self.world:
                    continue
                if ((r.g - self.rank) // self.world - j0) % workers != k:
                    continue
                pending.append(r)
                if len(pending) >= CHUNK:
                    yield from self._encode(pending)
                    pending = []
        except BitblendError as exc:  # an Item, not a raise: DataLoader would add a traceback
            yield from self._encode(pending)
            yield Item(error=str(exc))

    def _encode(self, rows: list[Any]) -> Iterator[Item]:
        if not rows:
            return
        texts = [str(r.row[self.source.column]) for r in rows]
        if self.packed:
            ids = encode_documents(self.tokenizer, texts)
        else:
            ids = encode_texts(self.tokenizer, texts, self.max_length)
        for r, x in zip(rows, ids, strict=True):
            yield Item(r.g, r.cursor.as_list(), x, r.skipped, r.note)


def _identity(item: Any) -> Any:
    return item  # batch_size=None hands single items: keep them as they are


class _Thread:
    """Iterates a dataset on a daemon thread into a bounded queue (stream_workers: 0)."""

    def __init__(self, rows: ConsumerRows) -> None:
        self.queue: queue.Queue[Item] = queue.Queue(maxsize=PREFETCH * CHUNK)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(rows,), daemon=True)
        self.thread.start()

    def _run(self, rows: ConsumerRows) -> None:
        try:
            for item in rows:
                while not self.stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except Exception as exc:  # never die silently: the trainer would wait forever
            self.queue.put(Item(error=f"stream reader failed: {type(exc).__name__}: {exc}"))

    def __next__(self) -> Item:
        return self.queue.get()

    def close(self) -> None:
        self.stop.set()


class StreamSampler:
    """The batch stream of a streamed task, with the interface of `BatchSampler`: `next()`
    and `take(k)` fill the task's `StreamedSplit` with this rank's rows and return their
    indices in it (0..n-1), so the step code runs unchanged."""

    def __init__(
        self,
        split: StreamedSplit,
        source: StreamSource,
        tokenizer: Any,
        max_length: int,
        batch_size: int,
        workers: int,
        seed: int,
        packed: bool = False,
    ) -> None:
        self.split, self.source = split, source
        self.tokenizer, self.max_length = tokenizer, max_length
        self.batch_size, self.workers, self.seed = batch_size, workers, seed
        self.rank, self.world_size = 0, 1
        self.consumed = 0  # global rows taken by all ranks together
        self.anchor: Cursor | None = None  # resume point: the reader restarts after it
        self.anchor_skipped = 0
        self.last: Cursor | None = None  # the last row this rank took
        self.skipped = 0
        self.first_note: str | None = None
        self.wait = 0.0  # seconds the training thread waited for rows since `pop_wait`
        self._it: Any = None
        self._loader: Any = None
        # Packing: `consumed` counts packed rows; `last` is the last document fed.
        self.packer = Packer(max_length, pack_eos(tokenizer, split.head)) if packed else None
        self.ready: list[tuple[list[int], list[int]]] = []  # full rows consumed, consumed + 1, ...

    # -- reading -------------------------------------------------------------------------
    def _start(self) -> None:
        after = self.last or self.anchor
        skipped = self.skipped if self.last is not None else self.anchor_skipped
        first = self.consumed
        if self.packer is not None:  # documents: the one after the last fed
            first = after.g + 1 if after is not None else 0
        rows = ConsumerRows(self.source, self.tokenizer, self.max_length, after, skipped,
                            first, self.rank, self.world_size, self.packer is not None)  # fmt: skip
        if self.workers == 0:
            self._it = _Thread(rows)
            return
        # Forked workers must not use the tokenizers library's own threads (it would warn
        # and disable them itself); the training process tokenises nothing of a stream.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # A DataLoader draws its workers' base seed from the global RNG unless given a
        # generator: that draw would shift dropout and break resume == straight run.
        gen = torch.Generator().manual_seed(self.seed)
        self._loader = torch.utils.data.DataLoader(
            rows, batch_size=None, num_workers=self.workers, collate_fn=_identity,
            prefetch_factor=PREFETCH * CHUNK, generator=gen,
        )  # fmt: skip
        self._it = iter(self._loader)

    def _pull(self, n: int, first: int, stride: int = 0) -> list[Item]:
        """This rank's next `n` rows; the first must be global row `first`, the others
        `stride` (default: the world size) apart."""
        if n and self._it is None:
            self._start()
        t0 = time.perf_counter()
        out = []
        for _ in range(n):
            item = next(self._it)
            if item.error is not None:  # checked at once: the readers end after an error
                self.close()
                raise BitblendError(item.error)
            out.append(item)
        self.wait += time.perf_counter() - t0
        for i, item in enumerate(out):
            want = first + i * (stride or self.world_size)
            if item.g != want:  # a reader that lost its place must never train silently
                raise RuntimeError(f"stream {self.source.label}: row {item.g}, expected {want}")
        if out:
            last = out[-1]
            assert last.cursor is not None
            self.last = Cursor(*last.cursor)
            self.skipped = last.skipped
            if self.first_note is None:
                self.first_note = next((x.note for x in out if x.note), None)
        return out

    def _take_packed(self, k: int) -> np.ndarray:
        """Packed: feed documents until the next `k` global rows are full; keep this rank's."""
        assert self.packer is not None
        t0, waited = time.perf_counter(), self.wait
        while len(self.ready) < k:
            after = self.last or self.anchor
            (doc,) = self._pull(1, after.g + 1 if after is not None else 0, stride=1)
            self.ready.extend(self.packer.feed(doc.ids or []))
        # Packing runs on the training thread: its time is data wait too.
        self.wait = waited + time.perf_counter() - t0
        mine = [
            self.ready[i] for i in range(k) if (self.consumed + i) % self.world_size == self.rank
        ]
        del self.ready[:k]
        self.consumed += k
        self.split.ids = [ids for ids, _ in mine]
        self.split.segments = [seg for _, seg in mine]
        self.split.lengths = np.asarray([len(x) for x in self.split.ids], dtype=np.int64)
        self.split.targets = np.zeros(len(mine), dtype=np.float32)
        return np.arange(len(mine))

    def _fill(self, items: list[Item]) -> np.ndarray:
        ids = [x.ids or [] for x in items]
        self.split.ids = ids
        self.split.lengths = np.asarray([len(x) for x in ids], dtype=np.int64)
        self.split.targets = np.zeros(len(ids), dtype=np.float32)
        return np.arange(len(ids))

    def _mine(self, k: int) -> tuple[int, int]:
        """(count, first global row) of this rank's rows among the next `k` global rows."""
        first = self.consumed + (self.rank - self.consumed) % self.world_size
        return len(range(first, self.consumed + k, self.world_size)), first

    def next(self) -> np.ndarray:
        """This rank's part of the next global batch (indices into the task's split)."""
        return self.take(self.batch_size)

    def take(self, k: int) -> np.ndarray:
        """This rank's part of the stream's next `k` rows (k counts all ranks together)."""
        if k < 0:
            raise ValueError(f"take({k}): expected k >= 0")
        if self.packer is not None:
            return self._take_packed(k)
        n, first = self._mine(k)
        items = self._pull(n, first)
        self.consumed += k
        return self._fill(items)

    def pop_wait(self) -> float:
        """Seconds waited for rows since the last call."""
        wait, self.wait = self.wait, 0.0
        return wait

    def set_rank(self, rank: int, world_size: int) -> None:
        """Serve rank `rank` of `world_size` from here on (the position stays global)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of {world_size}: out of range")
        if self.batch_size % world_size:
            raise ValueError(f"batch {self.batch_size} is not divisible by {world_size} ranks")
        if (rank, world_size) != (self.rank, self.world_size):
            self.close()
            self.rank, self.world_size = rank, world_size

    def close(self) -> None:
        """Stop the reader (a new one starts on the next read)."""
        if isinstance(self._it, _Thread):
            self._it.close()
        self._it = self._loader = None

    @property
    def epochs_completed(self) -> float:
        """Epochs of this stream seen so far (fractional part: shards done / shards)."""
        return self.source.epochs_at(self.last)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Global rows consumed, the last row's cursor (epoch, shard, window, offset, g),
        the shuffle seed and window, and the skip count."""
        cur = self.last or self.anchor
        return {
            "kind": "stream",
            "consumed": self.consumed,
            "cursor": cur.as_list() if cur else None,
            "shard": str(self.source.shards[self.source.order(cur.epoch)[cur.shard]])
            if cur
            else None,
            "seed": self.source.seed,
            "shuffle_buffer": self.source.shuffle_buffer,
            "skipped": self.skipped,
            "first_note": self.first_note,
            # Packed: the partial row and the full rows after `consumed` (see the module doc).
            "packer": self.packer.state_dict() if self.packer is not None else None,
            "ready": [[ids, seg] for ids, seg in self.ready],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position."""
        if state.get("kind") != "stream":
            raise BitblendError(
                f"{self.source.label}: the checkpoint read this task's data in memory; resume "
                "it with streaming: false"
            )
        if int(state["seed"]) != self.source.seed or int(state["shuffle_buffer"]) != (
            self.source.shuffle_buffer
        ):
            raise BitblendError(
                f"{self.source.label}: the checkpoint streamed with seed {state['seed']} and "
                f"shuffle_buffer {state['shuffle_buffer']}; resume with the same"
            )
        self.close()
        self.consumed = int(state["consumed"])
        self.anchor = Cursor(*state["cursor"]) if state["cursor"] is not None else None
        self.anchor_skipped = self.skipped = int(state["skipped"])
        self.first_note = state.get("first_note")
        self.last = None
        if (self.packer is not None) != (state.get("packer") is not None):
            now = "packs" if self.packer is not None else "does not pack"
            raise BitblendError(
                f"{self.source.label}: the task {now} its rows but the checkpoint did not; "
                "resume with the same tasks[i].packing"
            )
        if self.packer is not None:
            self.packer.load_state_dict(state["packer"])
            self.ready = [(list(ids), list(seg)) for ids, seg in state["ready"]]


def pop_data_wait(samplers: list[Any]) -> float:
    """Seconds this step waited for its rows (streamed tasks; in-memory batches are ready)."""
    return sum((s.pop_wait() for s in samplers if isinstance(s, StreamSampler)), 0.0)


def data_errors(tasks: list[Any]) -> dict[str, dict[str, Any]]:
    """Rows skipped by `data_errors: skip` per task (summary.json): at load for sharded
    sources read whole, by the reader so far for streamed ones, with the first message.
    `tasks`: the trainer's TaskRuntime objects (cfg, data, sampler)."""
    out = {}
    for t in tasks:
        if t.cfg.data_errors != "skip":
            continue
        count, note = t.data.skipped, t.data.skip_note
        if isinstance(t.sampler, StreamSampler):
            count, note = t.sampler.skipped, t.sampler.first_note
        out[t.cfg.name] = {"skipped": count, "first": note}
    return out
