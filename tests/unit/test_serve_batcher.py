"""The dynamic batcher's waiting rule: a lone request runs at once, whatever max-wait is;
a batch waits (up to max-wait) only for requests the server already holds."""

from __future__ import annotations

import asyncio

import numpy as np

from bitblend.data.table import Table
from bitblend.serve.batcher import Batcher

LONG_WAIT_MS = 20_000.0  # far longer than any test here may take


def _infer(task: str, table: Table) -> np.ndarray:
    """One output per row: its text's length (enough to check rows come back in order)."""
    return np.array([[float(len(t))] for t in table.text or []], dtype=np.float32)


def _row(text: str) -> Table:
    return Table(labels=[None], text=[text])


def test_a_lone_request_is_not_held_back_by_max_wait() -> None:
    """Nothing else queued or on its way: the request's batch runs without sitting out the
    20 s max-wait (the recorded wait is the queue's, well under a second)."""

    async def go() -> tuple[np.ndarray, Batcher]:
        batcher = Batcher(_infer, max_batch=32, max_wait_ms=LONG_WAIT_MS)
        batcher.start()
        try:
            out = await asyncio.wait_for(batcher.submit("t", _row("abc")), LONG_WAIT_MS / 2000)
        finally:
            await batcher.close()
        return np.asarray(out), batcher

    out, batcher = asyncio.run(go())
    assert out.tolist() == [[3.0]]
    assert batcher.last_wait < 1.0, batcher.last_wait
    assert batcher.metrics.batch_wait.count == 1 and batcher.metrics.batch_wait.total < 1.0


def test_a_batch_waits_for_an_expected_request_and_runs_both_together() -> None:
    """A request being parsed (`expect`) is waited for: when it is queued (`arrived`) the
    two rows run as one batch, each getting its own output."""

    async def go() -> tuple[list[np.ndarray], Batcher]:
        batcher = Batcher(_infer, max_batch=32, max_wait_ms=LONG_WAIT_MS)
        batcher.start()
        try:
            batcher.expect()  # a second request is being read
            first = asyncio.ensure_future(batcher.submit("t", _row("a")))
            await asyncio.sleep(0.05)  # the worker has seen the first row and waits
            assert not first.done()
            second = batcher.enqueue("t", _row("bbbb"))
            batcher.arrived()
            outs = await asyncio.wait_for(asyncio.gather(first, second), LONG_WAIT_MS / 2000)
        finally:
            await batcher.close()
        return [np.asarray(o) for o in outs], batcher

    outs, batcher = asyncio.run(go())
    assert [o.tolist() for o in outs] == [[[1.0]], [[4.0]]]
    hist = batcher.metrics.batch_rows
    assert hist.count == 1 and hist.total == 2  # one forward of two rows
    assert batcher.last_wait < 1.0
