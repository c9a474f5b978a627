"""What the end of a CPU run maps on top of its peak RSS.

The scikit-learn baselines and report.html run after the final checkpoint, and import
scikit-learn's estimators and matplotlib and draw the plots: new pages outside the heap
(Python's own arenas, the libraries' mapped code and data), on top of the high-water mark,
while their heap allocations fit the holes the steps left (the main heap did not grow in
any of three users' runs; RSS grew 24-28 MiB; docs/estimate.md "Whole runs"). It depends
on the installed libraries, so the runtime child measures it (estimate/runtime.py).

An earlier round counted a second whole-run term here, a heap layout the shorter steps of
a run leave below its longest one. That rise is oneDNN's per-shape kernel caches
(estimate/kernel_cache.py): with both caches off the run with batches of every
length peaked where the one padded to a single length did.
"""

from __future__ import annotations

import importlib
import io
from pathlib import Path

# what the end of a run imports and runs: the baselines' scikit-learn estimators
# (tasks/baselines.py) and the report's plots (report/plots.py, matplotlib)
END_MODULES = (
    "sklearn.feature_extraction.text",
    "sklearn.linear_model",
    "sklearn.ensemble",
    "sklearn.pipeline",
    "sklearn.preprocessing",
    "sklearn.impute",
    "bitblend.report.plots",
)


def _outside_heap() -> int:
    """Resident bytes of this process outside glibc's main heap (Linux; 0 where unknown)."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return 0
    total = heap = 0
    name = ""
    for line in text.splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not line[0].isupper():
            name = fields[5] if len(fields) > 5 else ""
        elif line.startswith("Rss:"):
            kb = int(fields[1])
            total += kb
            heap += kb if name == "[heap]" else 0
    return (total - heap) * 1024


def end_of_run_bytes() -> int:
    """Measured in the runtime child, after its peak: resident bytes outside the heap that
    the end of a run adds - its modules imported and one plot drawn to PNG."""
    before = _outside_heap()
    for name in END_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional extra missing: train skips that part as well
            continue
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return max(0, _outside_heap() - before)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot(range(100), [i**0.5 for i in range(100)], label="loss")
    ax.set_title("loss")
    ax.legend()
    fig.savefig(io.BytesIO(), format="png", dpi=100)
    return max(0, _outside_heap() - before)
