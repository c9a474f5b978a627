"""This machine's measured peaks: matmul FLOP/s per dtype, memory bandwidth, dropout RNG
rate and per-op overhead, from a short probe cached under ~/.cache/bitblend/.

A datasheet peak says little on a 2-core CPU that others share; a measured one is what
time estimates and MFU should be judged against. The cache key names the device, the
thread count and the torch version, so a different machine or setting probes again.

A cached probe is never trusted blindly: a probe taken while the machine was busy reads low
and would make every later MFU too high and every time estimate too long. So an entry is
probed again when it is older than MAX_AGE_S, when it was taken under load and the machine
is quieter now, and when a finished run's measured FLOP/s beats it (`confirm_peak`); each
entry records when and under what load it was measured.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from bitblend.estimate.first_touch import first_touch

CACHE_ENV = "BITBLEND_CACHE_DIR"
CACHE_FILE = "probe.json"
PROBE_VERSION = 6  # part of the cache key: a changed probe never reads an old entry
MAX_AGE_S = 7 * 24 * 3600.0  # a week: kernels, clocks and neighbours change
ROUNDS = 3  # the matmul probes run as this many short rounds, interleaved; the best counts
BANDWIDTH_ELEMENTS = 8 * 2**20  # fp32: three 32 MiB buffers
SPEED_BUDGET_S = 0.3  # the check of the rates now that an estimate adds (speed_now)
MAX_CALL_S = 0.1  # one timed call of the probe's Linear on CPU; a slower dtype gets SMALL
CPU_LINEAR, SMALL_LINEAR = (1024, 512, 1024), (256, 256, 256)  # t, k, n of the Linear


@dataclass
class Peaks:
    """Measured rates of one device."""

    device: str  # "cpu: AMD EPYC ..." or "cuda: NVIDIA H200"
    threads: int
    # dtype name -> FLOP/s of a Linear's forward + backward matmuls, and of SDPA-sized bmms
    matmul_flops: dict[str, float] = field(default_factory=dict)
    attention_flops: dict[str, float] = field(default_factory=dict)
    bandwidth: float = 0.0  # bytes/s of an out-of-cache elementwise add (typical: _bandwidth)
    rng: float = 0.0  # bernoulli draws/s (PyTorch's dropout masks)
    fast_rng: float = 0.0  # mask elements/s of bitblend's CPU dropout (models/attention.py)
    op_overhead: float = 0.0  # seconds per small autograd op (dispatch + bookkeeping)
    # CPU: seconds per 4 KiB page a process touches for the first time (the page fault and
    # the zeroing; far more in a VM whose host backs guest memory lazily): what a run's
    # first steps pay to grow to their high-water (estimate/__init__.py's warm-up)
    page_fault: float = 0.0
    # CPU, the memory's state when probed: seconds per page that comes from pages freed
    # lately and still backed (the host's recycled pool), and how many bytes of it the
    # probe met before the dear pages (all it touched, where it met none)
    recycled_page: float = 0.0
    recycled_bytes: int = 0
    # CPU: the share of the probed matmul peaks and of the bandwidth the machine gives now
    # (`speed_now`): a VM's neighbours took 20-25% of the matmul rate here for hours, and
    # the bandwidth read 40-130 GB/s by the hour. Times are priced at them (`at_speed`),
    # MFU is not (its denominator is what the hardware can do).
    speed: float = 1.0
    memory_speed: float = 1.0
    seconds: float = 0.0  # how long the probe took
    cached: bool = False  # read from the cache rather than measured now
    # When and under what conditions it was measured (an entry without them is stale).
    measured_at: float = field(default_factory=time.time)  # Unix time
    load_avg: float = 0.0  # 1-minute load average when the probe started
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    source: str = "fresh"  # fresh | cached | reprobed (best of the cache and a new probe)
    reason: str = ""  # why it was (re)measured: missing, stale, busy-then, beaten, asked

    def conditions(self) -> dict[str, object]:
        """When, how and under what load the peaks were measured (for summary.json)."""
        return {
            "source": self.source,
            "reason": self.reason,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.measured_at)),
            "age_s": round(max(0.0, time.time() - self.measured_at), 1),
            "load_avg_at_probe": self.load_avg,
            "load_avg_now": load_average(),
            "cpus": self.cpus,
            "threads": self.threads,
            "probe_seconds": round(self.seconds, 3),
        }

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s of `dtype` matmuls (fp32's when the dtype was not probed)."""
        return self.matmul_flops.get(dtype) or self.matmul_flops["float32"]

    def attention(self, dtype: str) -> float:
        """FLOP/s of attention-sized batched matmuls in `dtype` (the matmul peak if unknown)."""
        return self.attention_flops.get(dtype) or self.flops(dtype)

    def at_speed(self) -> Peaks:
        """The rates the machine gives now: the bandwidth x `memory_speed`, every other rate
        x `speed`, every per-op cost / it. The first-touch costs are measured now already
        and stay."""
        s = self.speed
        return replace(
            self,
            matmul_flops={k: v * s for k, v in self.matmul_flops.items()},
            attention_flops={k: v * s for k, v in self.attention_flops.items()},
            bandwidth=self.bandwidth * self.memory_speed,
            rng=self.rng * s,
            fast_rng=self.fast_rng * s,
            op_overhead=self.op_overhead / s,
            speed=1.0,
            memory_speed=1.0,
        )


def load_average() -> float:
    """The 1-minute load average (0.0 where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return 0.0


def best_of(a: Peaks, b: Peaks) -> Peaks:
    """Per-rate best of two probes of one device: each probe is a lower bound of what the
    hardware can do, so the higher rate (the lower overhead) is the better bound."""

    def hi(x: dict[str, float], y: dict[str, float]) -> dict[str, float]:
        return {k: max(x.get(k, 0.0), y.get(k, 0.0)) for k in {**x, **y}}

    newer, older = (a, b) if a.measured_at >= b.measured_at else (b, a)
    overheads = [o for o in (a.op_overhead, b.op_overhead) if o > 0]
    return Peaks(
        device=newer.device,
        threads=newer.threads,
        matmul_flops=hi(a.matmul_flops, b.matmul_flops),
        attention_flops=hi(a.attention_flops, b.attention_flops),
        # Each probe's bandwidth is a typical rate (the lowest of its rounds' medians), and
        # every estimate prices elementwise traffic at the lower of the cached rate and the
        # add's median now (speed_now's memory_speed): the higher of two typical readings is
        # the right ceiling. Keeping the newer one let a probe taken in a slow phase (13.3
        # GB/s on an AMD EPYC VM, against 23.8 an hour before) price every later estimate's
        # elementwise time 1.8x, since memory_speed is at most 1.
        bandwidth=max(a.bandwidth, b.bandwidth),
        rng=max(a.rng, b.rng),
        fast_rng=max(a.fast_rng, b.fast_rng),
        op_overhead=min(overheads) if overheads else 0.0,
        # costs of the memory's state now, not peaks (0: not measured by that probe)
        page_fault=newer.page_fault or older.page_fault,
        recycled_page=newer.recycled_page or older.recycled_page,
        recycled_bytes=newer.recycled_bytes if newer.recycled_page else older.recycled_bytes,
        speed=newer.speed,
        memory_speed=newer.memory_speed,
        seconds=newer.seconds,
        measured_at=newer.measured_at,
        load_avg=newer.load_avg,
        cpus=newer.cpus,
    )


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


def _rates(
    fn: Callable[[], object],
    work: float,
    device: torch.device,
    budget: float,
    clock: Callable[[], float],
    least: int,
) -> list[float]:
    """Rates (work units per second) of repeated timings of `fn` after one untimed call: at
    least `least`, then more while `budget` seconds last, at most 50."""
    fn()
    _sync(device)
    rates: list[float] = []
    end = time.perf_counter() + budget
    while len(rates) < least or (time.perf_counter() < end and len(rates) < 50):
        t0 = clock()
        fn()
        _sync(device)
        rates.append(work / max(clock() - t0, 1e-9))
    return rates


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
    return max(_rates(fn, work, device, budget, clock, least=3))


def _median_rate(
    fn: Callable[[], object],
    work: float,
    device: torch.device,
    budget: float,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median of at least 5 timings of `fn` (work units per call) within `budget`: what
    the machine gives now, where a best reading would catch a burst."""
    import statistics

    return statistics.median(_rates(fn, work, device, budget, clock, least=5))


def _bandwidth(
    device: torch.device,
    gen: torch.Generator,
    budget: float,
    clock: Callable[[], float] = time.perf_counter,
    typical: bool = False,
) -> float:
    """Bytes/s of an elementwise add over buffers far larger than cache: elementwise ops
    move bytes, not FLOPs. The best of repeated adds, or their median (`typical`).

    The time model wants the typical rate: the add's best reading swings with bursts
    (45-121 GB/s within an hour here; medians of a few dozen adds 39-117), while the
    users' steps and evaluations ran alike through them, and a cache holding a 121 GB/s
    burst priced the own-vocabulary evaluations 30% short where one reading 43 priced
    them within 2%. So the probe keeps the lowest of its rounds' medians (probe version
    6; version 5 kept the best add)."""
    n = BANDWIDTH_ELEMENTS
    x = torch.randn(n, device=device, generator=gen)
    y = torch.randn(n, device=device, generator=gen)
    z = torch.empty_like(x)
    add = functools.partial(torch.add, x, y, out=z)
    if typical:
        return _median_rate(add, 3.0 * n * 4, device, budget, clock)
    return _best_rate(add, 3.0 * n * 4, device, budget, clock)


def _linear_work(
    device: torch.device,
    dtype: torch.dtype,
    gen: torch.Generator,
    max_call_s: float = MAX_CALL_S,
) -> tuple[Callable[[], object], float]:
    """A training step's three matmuls of one Linear (`_linear_step`). On CPU, a smaller
    Linear where the full one would take over `max_call_s` a call."""
    if device.type == "cuda":
        return _linear_step(device, dtype, gen, 4096, 1024, 4096)
    if dtype == torch.float16:
        # no fast fp16 kernel on CPU (~0.3 GFLOP/s): keep it short
        return _linear_step(device, dtype, gen, 64, 64, 64)
    # No fast kernel for a dtype (bf16 on a CPU without AVX-512 BF16 or AMX: 2.6 GFLOP/s
    # on an AVX2 EPYC, 1.2 s a call of the full Linear): its rate hardly depends on the
    # shape, and the full one made the probe take ~19 s and every estimate's speed check
    # seconds. One timed call of the small Linear (after an untimed one) decides.
    small, small_work = _linear_step(device, dtype, gen, *SMALL_LINEAR)
    (rate,) = _rates(small, small_work, device, 0.0, time.perf_counter, least=1)
    t, k, n = CPU_LINEAR
    if 6.0 * t * k * n / rate > max_call_s:
        return small, small_work
    return _linear_step(device, dtype, gen, t, k, n)


def _linear_step(
    device: torch.device, dtype: torch.dtype, gen: torch.Generator, t: int, k: int, n: int
) -> tuple[Callable[[], object], float]:
    """A (t x k) @ (k x n) Linear's forward x @ w.T, input gradient gy @ w and weight
    gradient gy.T @ x (transposed operands cost some kernels more), and its FLOPs."""
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
    device: torch.device,
    budget: float = 1.5,
    clock: Callable[[], float] = time.perf_counter,
    touch: bool = True,
) -> Peaks:
    """Run the probe now: about `budget` seconds split over its parts. `clock` times each
    repetition: wall time, or time.process_time for a one-thread benchmark that other
    processes on the machine must not disturb. `touch=False` leaves the first-touch costs
    out (0): a finished run re-probing for its MFU must not map up to FAULT_MAX_BYTES more
    on top of what it holds (its summary's peak RSS would read them)."""
    t_start = time.perf_counter()
    peaks = Peaks(
        device=device_name(device), threads=torch.get_num_threads(), load_avg=load_average()
    )
    share = budget / 8
    gen = torch.Generator(device=device).manual_seed(0)
    # Several short rounds over the dtypes rather than one long look at each: a neighbour's
    # burst then costs one round of one dtype, not its whole reading. The best round counts.
    bandwidths: list[float] = []
    for _ in range(ROUNDS):
        # the add's median in each round: a typical rate, not a burst (_bandwidth)
        bandwidths.append(_bandwidth(device, gen, share / ROUNDS, clock, typical=True))
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            name = str(dtype).replace("torch.", "")
            slow = dtype == torch.float16 and device.type == "cpu"
            fn, work = _linear_work(device, dtype, gen)
            span = (share / 4 if slow else 1.5 * share) / ROUNDS
            rate = _best_rate(fn, work, device, span, clock)
            peaks.matmul_flops[name] = max(peaks.matmul_flops.get(name, 0.0), rate)
            if not slow:
                fn, work = _attention_work(device, dtype, gen)
                rate = _best_rate(fn, work, device, share / ROUNDS, clock)
                peaks.attention_flops[name] = max(peaks.attention_flops.get(name, 0.0), rate)
    peaks.bandwidth = min(bandwidths)
    # Dropout draws one random number per element; on CPU that costs more than the bytes.
    n = BANDWIDTH_ELEMENTS
    z = torch.empty(n, device=device)
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
    if device.type == "cpu" and touch:
        costs = first_touch(clock=clock)
        peaks.page_fault = costs.cold
        peaks.recycled_page, peaks.recycled_bytes = costs.warm, costs.pool_bytes
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
    if not isinstance(entry, dict) or "measured_at" not in entry:
        return None  # absent, or written before entries said when: probe again
    try:
        peaks = Peaks(**entry)  # type: ignore[arg-type]
    except TypeError:  # written by another version: probe again
        return None
    peaks.cached = True
    peaks.source = "cached"
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
        entry["source"], entry["reason"] = "fresh", ""
        # states of the moment: every estimate measures its own
        entry["speed"] = entry["memory_speed"] = 1.0
        data[cache_key(device)] = entry
        tmp = directory / f".{CACHE_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(directory / CACHE_FILE)
    except OSError:
        pass  # a read-only home: the probe still works, it just is not remembered


def stale_reason(peaks: Peaks, max_age: float = MAX_AGE_S) -> str:
    """Why a cached probe must not be trusted now ("" when it may be)."""
    if time.time() - peaks.measured_at > max_age:
        return "stale"
    # Taken under load (at least half a runnable process per core) and the machine is at
    # most half as busy now: the old reading is low, measure again.
    busy_then = peaks.load_avg >= 0.5 * peaks.cpus
    if busy_then and load_average() <= 0.5 * peaks.load_avg:
        return "busy-then"
    return ""


def get_peaks(
    device: torch.device,
    refresh: bool = False,
    budget: float = 1.5,
    max_age: float = MAX_AGE_S,
    now: bool = False,
    touch: bool = True,
) -> Peaks:
    """Cached peaks of `device`, measuring (and caching) them when missing, stale, taken
    while the machine was busier than now, or when asked. `now` (CPU, what an estimate
    asks): the machine's state is measured again beside the cached peaks - the page-fault
    costs (`first_touch`: the version-4 probe read 2.2 us a page one evening and 26-30
    the next morning here, as it met pages freed lately or the ones a VM's host backs on
    first touch; a short run's warm-up is mostly that cost) and the share of the peaks
    the machine gives now (`speed_now`). `touch=False`: a probe taken now leaves the
    page-fault costs out (`measure`) and keeps the cached entry's."""
    reason = "asked" if refresh else "missing"
    found = cached_peaks(device)
    if not refresh and found is not None:
        reason = stale_reason(found, max_age)
        if not reason:
            if now and device.type == "cpu":
                found = speed_now(device, _touch_now(device, found))
            return found
    peaks = measure(device, budget, touch=touch)
    if not touch and found is not None:
        peaks.page_fault = found.page_fault
        peaks.recycled_page, peaks.recycled_bytes = found.recycled_page, found.recycled_bytes
    if reason == "busy-then" and found is not None:
        # Measured again because the old probe was taken under load; the new one is a lower
        # bound too, and can read lower on a noisy host (fp32 144 GFLOP/s where the busy
        # probe had read 172): keep the best of both. A stale or asked-for probe replaces.
        peaks = best_of(found, peaks)
        peaks.source = "reprobed"
    peaks.reason = reason
    save_peaks(device, peaks)  # measured now: its speed is 1
    return peaks


def speed_now(device: torch.device, peaks: Peaks, budget: float = SPEED_BUDGET_S) -> Peaks:
    """`peaks` with `speed` and `memory_speed` set. `speed`: the fp32 and bf16 matmul
    rates measured now (the probe's own Linear shapes, best of a few) over the cached
    ones, their mean, at most 1. The cache keeps the best readings, for MFU; a shared host
    gives less for hours (bf16 706-774 GFLOP/s read here against a cached 953, while the
    users' runs came out 20% slower than their estimates). A matmul reading above the
    cache is a better peak: it is kept, in the cache too. `memory_speed`: the median of
    the probe's add now over the cached bandwidth, at most 1. The median, not the best:
    the add's best reading swings with bursts (45-121 GB/s within an hour here, medians
    42-50), and a cache holding a 95 GB/s burst priced the mixture's evaluations 23%
    short."""
    gen = torch.Generator(device=device).manual_seed(0)
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        fn, work = _linear_work(device, dtype, gen)
        rates[str(dtype).replace("torch.", "")] = _best_rate(fn, work, device, budget * 0.4)
    bandwidth = _bandwidth(device, gen, budget * 0.2, typical=True)
    beaten = {k: v for k, v in rates.items() if v > peaks.matmul_flops.get(k, 0.0)}
    if beaten:
        better = replace(peaks, matmul_flops={**peaks.matmul_flops, **beaten})
        save_peaks(device, better)
        peaks = replace(better, cached=peaks.cached, source=peaks.source)
    # the mean of now's rates over the cached ones (1 where a reading beat the cache)
    ratios = [v / peaks.matmul_flops[k] for k, v in rates.items() if peaks.matmul_flops.get(k)]
    peaks.speed = min(1.0, sum(ratios) / len(ratios)) if ratios else 1.0
    peaks.memory_speed = min(1.0, bandwidth / peaks.bandwidth) if peaks.bandwidth else 1.0
    return peaks


def speed_again(device: torch.device, peaks: Peaks) -> Peaks:
    """`peaks` with the better of its speed readings (`speed_now`) and a second one taken
    now. One check lasts ~0.3 s, and a shared host's dips can last as long: five runs of
    the users' recipes on an AMD EPYC VM read the matmul share at 0.81-0.99 and a sixth
    at 0.48, and that run then went as fast as the others (priced +45%). An estimate takes
    the second reading seconds after the first (its runtime child runs between them) and
    prices at the better: a dip costs one reading, a machine slow for minutes reads low
    in both. Each is a share of the cached peaks, at most 1."""
    again = speed_now(device, replace(peaks))
    memory = max(peaks.memory_speed, again.memory_speed)
    if again.matmul_flops != peaks.matmul_flops:  # now's reading beat the cache: the better
        return replace(again, memory_speed=memory)
    return replace(peaks, speed=max(peaks.speed, again.speed), memory_speed=memory)


def _touch_now(device: torch.device, peaks: Peaks) -> Peaks:
    """`peaks` with the first-touch costs measured now: the recycled pool's cost and size,
    and the cold cost where the probe got past the pool. Where it did not (a large process
    freed its pages lately) the cold cost stays the cached one: it prices the growth past
    the pool, and a run that starts later may meet no pool at all. A cold reading is
    cached."""
    touch = first_touch()
    peaks.recycled_page, peaks.recycled_bytes = touch.warm, touch.pool_bytes
    if touch.found_cold or touch.cold > peaks.page_fault:
        peaks.page_fault = touch.cold
        save_peaks(device, peaks)  # save_peaks marks the entry fresh
    return peaks


def confirm_peak(
    device: torch.device, peaks: Peaks, dtype: str, achieved: float, budget: float = 1.5
) -> Peaks:
    """`peaks`, or a better reading when a run's measured FLOP/s (`achieved`) beats its
    `dtype` peak: the probe was low (taken while busy), so probe again and keep the best of
    the old and new readings, in the cache too. Callers divide by the result; nothing is
    clamped."""
    if achieved <= peaks.flops(dtype):
        return peaks
    best = best_of(peaks, measure(device, budget, touch=False))  # see measure's `touch`
    best.source = "reprobed"
    best.reason = (
        f"beaten: a run reached {achieved / 1e9:.3g} GFLOP/s in {dtype}, above the "
        f"{peaks.source} probe's {peaks.flops(dtype) / 1e9:.3g}"
    )
    save_peaks(device, best)
    return best
