"""Where a training process's bytes are, step by step: RSS, glibc's heap statistics and the
process's mappings after the setup and around every backward and optimizer step.

What `bitblend estimate` models as layouts (estimate/highwater.py) was found with this: per
line, RSS and its peak so far (a 1 ms sampler), glibc's mallinfo2 (`arena`: heap bytes
taken from the system, all arenas; `mmap`: blocks above the mmap threshold; `inuse` /
`free`: allocated and free bytes in the heaps; `peaklive`: the largest inuse + mmap since
the previous line) and /proc/self/smaps summed by kind: `heap` (the main arena), `arenas`
(other threads' glibc arenas: 64 MiB-aligned anonymous maps - the tokenizer's and gloo's
worker threads), `anon` (other anonymous maps: mmapped blocks, Python, JIT code) and
`file` (libraries and the checkpoint's safetensors mapping, which a backbone's weights
may still point into).

    PYTHONPATH=src .venv/bin/python benchmarks/heap_steps.py bbc --set K=V ... [--steps 4]
        [--only-steps]   # one line per step
    PYTHONPATH=src .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        benchmarks/heap_steps.py bbc --set distributed.strategy=fsdp2 ...   # one block per rank

`GLIBC_TUNABLES=glibc.malloc.arena_max=1` in the environment gives every thread the main
arena (bitblend's own heap tuning stays on; a MALLOC_* variable would turn it off).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

MIB = 2**20


PAGE = os.sysconf("SC_PAGE_SIZE")
RANK = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ else ""


def _mallinfo() -> Any:
    """glibc's heap statistics now (bitblend.procmem; this benchmark needs glibc)."""
    from bitblend.procmem import mallinfo

    info = mallinfo()
    if info is None:
        raise SystemExit("heap_steps.py reads glibc's mallinfo2: Linux with glibc 2.33+")
    return info


def rss() -> int:
    """Resident bytes now."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def mappings() -> dict[str, int]:
    """Resident MiB by kind of mapping (see the module docstring)."""
    out = {"heap": 0, "arenas": 0, "anon": 0, "file": 0}
    name, start = "", 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        f = line.split()
        if "-" in f[0] and not line[0].isupper():
            start, name = int(f[0].split("-")[0], 16), (f[5] if len(f) > 5 else "")
        elif line.startswith("Rss:"):
            kb = int(f[1])
            if name == "[heap]":
                out["heap"] += kb
            elif not name and start % 0x4000000 == 0:  # glibc's HEAP_MAX_SIZE alignment
                out["arenas"] += kb
            elif not name or name.startswith("["):
                out["anon"] += kb
            else:
                out["file"] += kb
    return {k: v // 1024 for k, v in out.items()}


class Probe:
    """A 1 ms sampler of RSS and live malloc bytes; `show` prints one line."""

    def __init__(self, only_steps: bool) -> None:
        self.only_steps = only_steps
        self.peak_rss = 0
        self.peak_live = 0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            info = _mallinfo()
            self.peak_rss = max(self.peak_rss, rss())
            self.peak_live = max(self.peak_live, info.uordblks + info.hblkhd)
            time.sleep(0.001)

    def show(self, label: str) -> None:
        """RSS, heap statistics and mappings now; the peaks since the last line."""
        if self.only_steps and not label.startswith("step"):
            return
        i = _mallinfo()
        print(
            f"{RANK}{label:24} rss {rss() / MIB:5.0f} peak {self.peak_rss / MIB:5.0f} | "
            f"arena {i.arena / MIB:5.0f} mmap {i.hblkhd / MIB:4.0f} "
            f"inuse {i.uordblks / MIB:4.0f} free {i.fordblks / MIB:4.0f} "
            f"peaklive {self.peak_live / MIB:4.0f} | {mappings()}",
            flush=True,
        )
        self.peak_live = 0


def wrap(owner: Any, name: str, probe: Probe) -> None:
    """Show a line before and after every call of owner.name."""
    fn = getattr(owner, name)

    def shown(*a: Any, **k: Any) -> Any:
        probe.show(f"before {name}")
        out = fn(*a, **k)
        probe.show(f"after {name}")
        return out

    setattr(owner, name, shown)


def fit_lines(t: Any, probe: Probe) -> None:
    """The whole run: a line after every step and around evaluations, checkpoints, the
    baselines, model/ and the report (where a run's later phases add to its high-water)."""
    import bitblend.report.html as html
    import bitblend.train.trainer as trainer

    step = t.train_step

    def shown_step() -> Any:
        out = step()
        probe.show(f"step {t.step} {out['task'][:8]} {out['tokens']}")
        return out

    t.train_step = shown_step
    for name in ("evaluate", "save_checkpoint"):
        wrap(t, name, probe)
    for name in ("run_baselines", "save_model"):
        wrap(trainer, name, probe)
    wrap(html, "write_report", probe)
    t.fit()
    probe.show("fit done")


def main() -> None:
    """Build a Trainer for the recipe and run its first steps, showing each part."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--only-steps", action="store_true")
    p.add_argument(
        "--fit",
        action="store_true",
        help="run the whole fit() (evaluations, checkpoints, baselines, save, report), a "
        "line after every step and around each of those phases",
    )
    args = p.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    # this script's folder is sys.path[0], and benchmarks/peft.py would shadow peft
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    probe = Probe(args.only_steps)
    import bitblend.train.trainer as trainer
    from bitblend.config.load import load_recipe

    for name in ("build_model", "build_tasks", "convert_model"):
        wrap(trainer, name, probe)
    recipe = load_recipe(args.recipe, args.set)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun: every rank writes one run dir
            run = Path(tempfile.gettempdir()) / f"heap-{os.environ['TORCHELASTIC_RUN_ID']}"
        t = trainer.Trainer(recipe, run, show_progress=False)
        probe.show("trainer built")
        if args.fit:
            fit_lines(t, probe)
            return
        for name in ("backward", "optimizer_step"):
            wrap(t.precision, name, probe)
        for k in range(args.steps):
            t.train_step()
            probe.show(f"step {k + 1} done")


if __name__ == "__main__":
    main()
