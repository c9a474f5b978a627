"""This machine's measured peaks: matmul FLOP/s per dtype, memory bandwidth, dropout RNG
rate and per-op overhead, from a short probe cached under ~/.cache/bitblend/.

A datasheet peak says little on a 2-core CPU that others share; a measured one is what
time estimates and MFU should be judged against. The cache key names the device, the
thread count and the torch version, so a different machine or setting probes again.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CACHE_ENV = "BITBLEND_CACHE_DIR"
CACHE_FILE = "probe.json"
PROBE_VERSION = 3  # part of the cache key: a changed probe never reads an old entry


@dataclass
class Peaks:
    """Measured rates of one device."""

    device: str  # "cpu: AMD EPYC ..." or "cuda: NVIDIA H200"
    threads: int
    # dtype name -> FLOP/s of a Linear's forward + backward matmuls, and of SDPA-sized bmms
    matmul_flops: dict[str, float] = field(default_factory=dict)
    attention_flops: dict[str, float] = field(default_factory=dict)
    bandwidth: float = 0.0  # bytes/s of an out-of-cache elementwise add
    rng: float = 0.0  # bernoulli draws/s (PyTorch's dropout masks)
    fast_rng: float = 0.0  # mask elements/s of bitblend's CPU dropout (models/attention.py)
    op_overhead: float = 0.0  # seconds per small autograd op (dispatch + bookkeeping)
    seconds: float = 0.0  # how long the probe took
    cached: bool = False  # read from the cache rather than measured now

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s of `dtype` matmuls (fp32's when the dtype was not probed)."""
        return self.matmul_flops.get(dtype) or self.matmul_flops["float32"]

    def attention(self, dtype: str) -> float:
        """FLOP/s of attention-sized batched matmuls in `dtype` (the matmul peak if unknown)."""
        return self.attention_flops.get(dtype) or self.flops(dtype)


def cache_dir() -> Path:
    """~/.cache/bitblend, or $BITBLEND_CACHE_DIR (tests point it at a temp dir)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bitblend"


def device_name(device: torch.device) -> str:
    """A readable, stable name of the device: the CPU model or the GPU name."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {name}"


def cache_key(device: torch.device) -> str:
    """Device, threads, torch and probe version: what the measured rates depend on."""
    return (
        f"{device_name(device)} | threads={torch.get_num_threads()} | "
        f"torch={torch.__version__} | probe={PROBE_VERSION}"
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_rate(
    fn: Callable[[], object],
    work: float,
    device: torch.device,
    budget: float,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Best of repeated timings of `fn` (work units per call) within `budget` seconds.

    The best, not the mean: other processes may share the machine, and a peak is what the
    hardware can do when it gets the cores.
    """
    fn()
    _sync(device)
    best = 0.0
    end = time.perf_counter() + budget
    reps = 0
    while reps < 3 or time.perf_counter() < end:
        t0 = clock()
        fn()
        _sync(device)
        dt = clock() - t0
        best = max(best, work / max(dt, 1e-9))
        reps += 1
        if reps >= 50:
            break
    return best


def _linear_work(
    device: torch.device, dtype: torch.dtype, gen: torch.Generator
) -> tuple[Callable[[], object], float]:
    """A training step's three matmuls of one Linear: forward x @ w.T, input gradient
    gy @ w and weight gradient gy.T @ x (transposed operands cost some kernels more)."""
    t, k, n = (4096, 1024, 4096) if device.type == "cuda" else (1024, 512, 1024)
    if dtype == torch.float16 and device.type == "cpu":
        t, k, n = 64, 64, 64  # no fast fp16 kernel on CPU (~0.3 GFLOP/s): keep it short
    x = torch.randn(t, k, device=device, generator=gen).to(dtype)
    w = torch.randn(n, k, device=device, generator=gen).to(dtype)
    gy = torch.randn(t, n, device=device, generator=gen).to(dtype)

    def step() -> None:
        x @ w.t()
        gy @ w
        gy.t() @ x

    return step, 3 * 2.0 * t * k * n


def _attention_work(
    device: torch.device, dtype: torch.dtype, gen: torch.Generator
) -> tuple[Callable[[], object], float]:
    """q @ k.T and probs @ v of SDPA's math path: many small (seq x head_dim) matmuls."""
    b, s, d = (64, 512, 64) if device.type == "cuda" else (96, 128, 32)
    q = torch.randn(b, s, d, device=device, generator=gen).to(dtype)
    k = torch.randn(b, d, s, device=device, generator=gen).to(dtype)
    probs = torch.randn(b, s, s, device=device, generator=gen).to(dtype)

    def step() -> None:
        torch.bmm(q, k)
        torch.bmm(probs, q)

    return step, 2 * 2.0 * b * s * s * d


def measure(
    device: torch.device, budget: float = 1.5, clock: Callable[[], float] = time.perf_counter
) -> Peaks:
    """Run the probe now: about `budget` seconds split over its parts. `clock` times each
    repetition: wall time, or time.process_time for a one-thread benchmark that other
    processes on the machine must not disturb."""
    t_start = time.perf_counter()
    peaks = Peaks(device=device_name(device), threads=torch.get_num_threads())
    share = budget / 8
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).replace("torch.", "")
        slow = dtype == torch.float16 and device.type == "cpu"
        fn, work = _linear_work(device, dtype, gen)
        peaks.matmul_flops[name] = _best_rate(
            fn, work, device, share / 4 if slow else 1.5 * share, clock
        )
        if not slow:
            fn, work = _attention_work(device, dtype, gen)
            peaks.attention_flops[name] = _best_rate(fn, work, device, share, clock)
    # Elementwise ops move bytes, not FLOPs: time an add over buffers far larger than cache.
    n = 8 * 2**20
    x = torch.randn(n, device=device, generator=gen)
    y = torch.randn(n, device=device, generator=gen)
    z = torch.empty_like(x)
    peaks.bandwidth = _best_rate(lambda: torch.add(x, y, out=z), 3.0 * n * 4, device, share, clock)
    # Dropout draws one random number per element; on CPU that costs more than the bytes.
    draw = functools.partial(z.bernoulli_, 0.9, generator=gen)
    peaks.rng = _best_rate(draw, float(n), device, share / 2, clock)
    if device.type == "cpu":
        from bitblend.models.attention import keep_mask

        fast = functools.partial(keep_mask, (n,), 0.1, device)
        peaks.fast_rng = _best_rate(fast, float(n), device, share / 4, clock)
    # Small autograd ops cost their dispatch: what dominates a tiny model's step.
    w = torch.ones(8, device=device, requires_grad=True)

    def tiny() -> None:
        out = w
        for _ in range(100):
            out = out * 1.0001
        out.sum().backward()

    # 100 forward muls, their 100 backward muls and the sum: about 200 aten ops per call.
    peaks.op_overhead = 1.0 / _best_rate(tiny, 200.0, device, share / 2, clock)
    peaks.seconds = time.perf_counter() - t_start
    return peaks


def _read_cache() -> dict[str, dict[str, object]]:
    path = cache_dir() / CACHE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_peaks(device: torch.device) -> Peaks | None:
    """The cached probe of this device and setting, or None."""
    entry = _read_cache().get(cache_key(device))
    if not isinstance(entry, dict):
        return None
    try:
        peaks = Peaks(**entry)  # type: ignore[arg-type]
    except TypeError:  # written by another version: probe again
        return None
    peaks.cached = True
    return peaks


def save_peaks(device: torch.device, peaks: Peaks) -> None:
    """Store `peaks` in the cache (atomically: a reader never sees half a file)."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Keep other devices and thread counts; drop entries of older probe versions.
        suffix = f"probe={PROBE_VERSION}"
        data = {k: v for k, v in _read_cache().items() if k.endswith(suffix)}
        entry = asdict(peaks)
        entry["cached"] = False
        data[cache_key(device)] = entry
        tmp = directory / f".{CACHE_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(directory / CACHE_FILE)
    except OSError:
        pass  # a read-only home: the probe still works, it just is not remembered


def get_peaks(device: torch.device, refresh: bool = False, budget: float = 1.5) -> Peaks:
    """Cached peaks of `device`, measuring (and caching) them when missing or asked."""
    if not refresh:
        found = cached_peaks(device)
        if found is not None:
            return found
    peaks = measure(device, budget)
    save_peaks(device, peaks)
    return peaks
