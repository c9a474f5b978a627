"""What a whole CPU run adds to its peak RSS beyond the longest step: the heap the shorter
steps laid out below it, and the end of the run's mappings on top.

Measured on the users' recipes (#22) with `benchmarks/heap_steps.py --fit`, which prints
glibc's heap and the process's mappings after every step and around every later phase
(MiniLM, bf16-mixed, 16 x 128 at most; docs/estimate.md "Whole runs: the shorter steps and
the end of the run"):

- *The shorter steps' layout.* `train` pads each batch to its own longest row, so a corpus
  of short texts runs short steps first and its longest batch some steps later. Own-
  vocabulary Chinese reviews: steps 1-5 (live transient 100-160 MiB) grew the main heap by
  210 MiB over the optimizer states, and step 6, the first at 128 tokens, by another
  273-315 MiB - its transient (298 MiB live) almost whole, on top. Its blocks (attention
  probabilities and MLP activations) are 2-4x the shorter steps' blocks, so they do not
  fit the holes those left, which the states and other long-lived objects keep from
  coalescing. The same run with every batch padded to 128 tokens (one shape from step 1)
  ended its heap 55-117 MiB lower (749 MiB against 804-866 over three runs), and a run
  whose every batch is full length (BBC News, whole articles) grew as the step-only model
  says. So when a task's steps vary in length, the heap keeps a layout of the shorter
  steps' transient bytes under the longest step's: counted as one step's transient at the
  task's mean priced length (estimate/lengths.py), the largest over the tasks whose steps
  vary (its activations and temporaries: the gradients' sizes do not depend on the
  length). No constant is fitted: the step's own model prices it.
- *The end of the run.* The scikit-learn baselines and report.html run after the final
  checkpoint, and import scikit-learn's estimators and matplotlib and draw the plots: new
  pages outside the heap (Python's own arenas, the libraries' mapped code and data), on
  top of the high-water mark, while their heap allocations fit the holes the steps left
  (the main heap did not grow in any of the three runs; RSS grew 24-28 MiB). It depends
  on the installed libraries, so the runtime child measures it (estimate/runtime.py).
"""

from __future__ import annotations

import importlib
import io
import math
from dataclasses import replace
from pathlib import Path

from bitblend.estimate.lengths import PricedLengths
from bitblend.estimate.memory import PrecisionSpec, peak_bytes
from bitblend.estimate.shapes import ModelShape, TaskShape

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


def shorter_steps_bytes(
    shape: ModelShape,
    tasks: list[TaskShape],
    priced: list[PricedLengths],
    spec: PrecisionSpec,
    states: int,
    device: str,
    fused: bool,
) -> int:
    """CPU: the heap a run's shorter steps leave below its longest one - the activations and
    temporaries (the bytes that grow with the length) of a step at the task's mean priced
    length, the largest over tasks whose steps are priced below their worst case (0 when
    every step runs at the worst length, lengths are unknown, or on a GPU, whose caching
    allocator reuses blocks of any earlier step)."""
    if device != "cpu":
        return 0
    out = 0
    for task, p in zip(tasks, priced, strict=True):
        if not p.measured or not p.train or p.mean_train >= p.worst:
            continue
        # positions scale the task's sequence (text tokens, plus patches where it has them)
        seq = max(1, math.ceil(task.seq * p.mean_train / p.worst))
        step = peak_bytes(shape, replace(task, seq=seq), spec, states, device, fused)
        # only the blocks that grow with the length: gradients have the same sizes at
        # every length and reuse their own holes (a tiny model's peak is its optimizer
        # step, whose transient is the gradients)
        out = max(out, step.activations + step.temporary_total)
    return out


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
