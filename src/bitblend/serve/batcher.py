"""Dynamic batching: concurrent requests gathered into one forward pass.

Requests wait in one bounded FIFO. The worker takes the oldest request and runs it, with
every queued request of the same kind (task, modalities, image shape) up to `max_batch`
rows, as one table on the inference thread. It waits (at most `max_wait_ms` after the
oldest arrived) only while the queue can still grow from requests the server already holds:
ones being read or parsed (`expect` / `arrived`). A lone request is never held back for
requests that may never come; while a forward runs, new requests queue up, so under load
the next batch is ready at once and batches grow with the load without any added wait.

One inference thread: the model work (tokenising, padding, forward) runs off the event loop,
and torch / ONNX Runtime parallelise each forward over every core with their own intra-op
threads; two forwards at once would only fight over the same 2 cores. Padding is by length
bucket inside the forward: the run's `outputs` sorts the rows by length before batching.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitblend.data.table import Table
from bitblend.serve.metrics import ServeMetrics

# (task, table) -> one result per row, in row order: raw outputs (n, outputs), or the
# service's rendered rows; the batcher only slices it per request.
Infer = Callable[[str, Table], Sequence[Any]]


class QueueFull(Exception):
    """The queue holds `max_queue` requests: answer 503 rather than grow without bound."""


class Closed(Exception):
    """The batcher is draining for shutdown and takes no new requests."""


@dataclass
class _Item:
    task: str
    table: Table
    future: asyncio.Future[Sequence[Any]]
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> Hashable:
        """Requests with equal keys can share a forward pass (same input tensors)."""
        image = None if self.table.image is None else self.table.image.shape[1:]
        return (self.task, tuple(self.table.modalities), image)


def concat_tables(tables: list[Table]) -> Table:
    """One table holding the rows of `tables` in order (same modalities and image shape)."""
    if len(tables) == 1:
        return tables[0]
    first = tables[0]
    return Table(
        labels=[y for t in tables for y in t.labels],
        text=None if first.text is None else [x for t in tables for x in t.text or []],
        image=None if first.image is None else np.concatenate([t.image for t in tables]),
        tabular=None if first.tabular is None else np.concatenate([t.tabular for t in tables]),
        audio=None if first.audio is None else [c for t in tables for c in t.audio or []],
        audio_rate=first.audio_rate,
    )


class Batcher:
    """Gathers `submit` calls into batches for `infer`; start() and close() on the loop."""

    def __init__(
        self,
        infer: Infer,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        metrics: ServeMetrics | None = None,
    ) -> None:
        self.infer = infer
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.max_queue = max(1, max_queue)
        self.metrics = metrics or ServeMetrics()
        self._queue: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._expected = 0  # requests accepted but not queued yet (body read, parse)
        self.last_wait = 0.0  # seconds the last batch's oldest request waited to run
        self._worker: asyncio.Task[None] | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="bitblend-infer")

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def run_on_thread(self, fn: Callable[[], object]) -> object:
        """Run `fn` on the inference thread (warm-up uses it), awaited from the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    def expect(self) -> None:
        """A request is on its way (being read or parsed): a batch may wait for it."""
        self._expected += 1

    def arrived(self) -> None:
        """An `expect`ed request is queued, or will not come (bad input)."""
        self._expected = max(0, self._expected - 1)
        self._wakeup.set()

    def enqueue(self, task: str, table: Table) -> asyncio.Future[Sequence[Any]]:
        """Queue a table of one task (synchronously, on the loop); the future holds its
        rows' results once its batch has run."""
        if self._closing:
            raise Closed
        if len(self._queue) >= self.max_queue:
            raise QueueFull
        item = _Item(task, table, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self.metrics.queue_depth.value = len(self._queue)
        self._wakeup.set()
        return item.future

    async def submit(self, task: str, table: Table) -> Sequence[Any]:
        """Queue a table of one task and await its rows' results."""
        return await self.enqueue(task, table)

    async def close(self) -> None:
        """Drain: answer every queued request, then stop the worker and the thread."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
        self.executor.shutdown(wait=True)

    def _rows_ready(self, key: Hashable) -> int:
        return sum(len(it.table) for it in self._queue if it.key == key and not it.future.done())

    async def _wait(self, timeout: float) -> None:
        self._wakeup.clear()
        with contextlib.suppress(asyncio.TimeoutError):  # not TimeoutError before 3.11
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _run(self) -> None:
        while True:
            while self._queue and self._queue[0].future.done():  # client went away
                self._queue.popleft()
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first = self._queue[0]
            # Wait only while requests the server holds may still join this batch; with none
            # on the way the queue cannot grow, and waiting would only add latency (a lone
            # request used to sit out the whole max-wait).
            while (
                not self._closing
                and self._expected > 0
                and self._rows_ready(first.key) < self.max_batch
            ):
                left = first.enqueued + self.max_wait - time.perf_counter()
                if left <= 0:
                    break
                await self._wait(left)
            self.last_wait = time.perf_counter() - first.enqueued
            self.metrics.batch_wait.observe(self.last_wait)
            await self._execute(self._take(first.key))

    def _take(self, key: Hashable) -> list[_Item]:
        """The oldest requests of `key` up to max_batch rows (at least one); others stay."""
        batch: list[_Item] = []
        rows = 0
        kept: deque[_Item] = deque()
        for it in self._queue:
            if it.future.done():
                continue
            n = len(it.table)
            if it.key == key and (not batch or rows + n <= self.max_batch):
                batch.append(it)
                rows += n
            else:
                kept.append(it)
        self._queue = kept
        self.metrics.queue_depth.value = len(kept)
        return batch

    async def _execute(self, batch: list[_Item]) -> None:
        table = concat_tables([it.table for it in batch])
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        self.metrics.in_flight.value = len(table)
        try:
            out = await loop.run_in_executor(self.executor, self.infer, batch[0].task, table)
        except Exception as exc:  # answered as 500 by the app; the server keeps serving
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(exc)
            return
        finally:
            self.metrics.in_flight.value = 0
        self.metrics.inference.observe(time.perf_counter() - start)
        self.metrics.batch_rows.observe(len(table))
        offset = 0
        for it in batch:
            n = len(it.table)
            if not it.future.done():
                it.future.set_result(out[offset : offset + n])
            offset += n
