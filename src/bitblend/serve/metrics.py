"""Prometheus text-format metrics (exposition format 0.0.4), written by hand.

Three kinds are all the server needs; prometheus_client would add a dependency and a
process-global registry (two servers in one test process would share counters).
Updates happen on the event loop thread only, so no locks.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


@dataclass
class Counter:
    """A monotonically increasing count per label set."""

    name: str
    help: str
    values: dict[tuple[tuple[str, str], ...], float] = field(default_factory=dict)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add `amount` to the series of `labels`."""
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        """The current value of one series (0 if never incremented)."""
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        """Exposition lines."""
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        out += [f"{self.name}{_labels(dict(k))} {v:g}" for k, v in sorted(self.values.items())]
        return out


@dataclass
class Gauge:
    """A value that goes up and down."""

    name: str
    help: str
    value: float = 0.0

    def render(self) -> list[str]:
        """Exposition lines."""
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge",
                f"{self.name} {self.value:g}"]  # fmt: skip


@dataclass
class Histogram:
    """Cumulative buckets, sum and count, as Prometheus histograms are exposed."""

    name: str
    help: str
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        """Record one observation."""
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.count += 1

    def render(self) -> list[str]:
        """Exposition lines (buckets are cumulative; +Inf equals the count)."""
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, c in zip(self.buckets, self.counts, strict=True):
            running += c
            out.append(f'{self.name}_bucket{{le="{bound:g}"}} {running}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{self.name}_sum {self.total:g}", f"{self.name}_count {self.count}"]
        return out


@dataclass
class ServeMetrics:
    """Everything /metrics exposes."""

    requests: Counter = field(
        default_factory=lambda: Counter(
            "bitblend_requests_total", "HTTP requests to /v1/predict by status code"
        )
    )
    rows: Counter = field(
        default_factory=lambda: Counter("bitblend_rows_total", "rows predicted, by task")
    )
    batch_rows: Histogram = field(
        default_factory=lambda: Histogram(
            "bitblend_batch_rows", "rows per gathered batch (dynamic batching)", BATCH_BUCKETS
        )
    )
    queue_depth: Gauge = field(
        default_factory=lambda: Gauge("bitblend_queue_depth", "requests waiting for a batch")
    )
    in_flight: Gauge = field(
        default_factory=lambda: Gauge(
            "bitblend_batch_in_flight_rows", "rows of the batch handed to the model, not done"
        )
    )
    latency: Histogram = field(
        default_factory=lambda: Histogram(
            "bitblend_request_latency_seconds",
            "time from request received to response ready (successful predictions)",
            LATENCY_BUCKETS,
        )
    )
    inference: Histogram = field(
        default_factory=lambda: Histogram(
            "bitblend_inference_seconds", "model time per batch", LATENCY_BUCKETS
        )
    )
    batch_wait: Histogram = field(
        default_factory=lambda: Histogram(
            "bitblend_batch_wait_seconds",
            "time a batch's oldest request waited in the queue before its batch ran",
            LATENCY_BUCKETS,
        )
    )

    def render(self) -> str:
        """The whole exposition text."""
        lines: list[str] = []
        for m in (self.requests, self.rows, self.batch_rows, self.queue_depth, self.in_flight,
                  self.latency, self.inference, self.batch_wait):  # fmt: skip
            lines += m.render()
        return "\n".join(lines) + "\n"
