"""1 vs 2 processes on this machine: tokens/s, step time (compute vs communication), peak
memory and model-state bytes per rank, for ddp and fsdp2, on a GPT and a BERT backbone.

Every case is a real `bitblend train` (one process) or `torchrun -m bitblend train`
(2 processes), one thread per process, so the comparison is fair on a 2-core machine:

  single   1 process, the global batch B          (the baseline)
  half     1 process, batch B/2                   (one rank's compute, no communication)
  ddp      2 ranks, global batch B (B/2 each)
  fsdp2    2 ranks, global batch B (B/2 each)

Step times are medians over the steps after the first two (from metrics.jsonl); a 2-rank
step minus the `half` step is the time spent communicating and waiting for the other rank.
ddp runs with `find_unused_parameters: false` (one task: every parameter gets a gradient,
so DDP need not search the graph each step; the setting docs/distributed.md recommends).

`--repeats R` runs the cases R times interleaved (single, half, ddp, fsdp2, single, ...)
and reports per-case medians plus the median of the R paired 2-rank/single ratios: on a
shared machine the load drifts between cases, and interleaving spreads that drift over all
of them. The 1-minute load average at the start of every case is kept with the figures.

    .venv/bin/python benchmarks/scaling.py [--backbones tiny-gpt,minilm] [--steps 20]
        [--batch 16] [--seq 128] [--cases single,half,ddp,fsdp2] [--repeats 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

SRC = str(Path(__file__).resolve().parents[1] / "src")
CASES = ("single", "half", "ddp", "fsdp2")


def recipe(backbone: str, steps: int, batch: int, seq: int, strategy: str) -> dict[str, Any]:
    """A BBC News classification recipe, 32-true, no eval to speak of, no mid-run checkpoint."""
    return {
        "name": f"scaling-{backbone}",
        "model": {"backbone": backbone, "max_length": seq},
        "tasks": [{"name": "bbc", "data": "bbc_news", "max_examples": 1024}],
        "precision": {"recipe": "32-true"},
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "train": {"steps": steps, "batch_size": batch, "eval_max_examples": 8, "threads": 1,
                  "checkpoint_every": 0, "keep_checkpoints": 1},
        "distributed": {"strategy": strategy, "find_unused_parameters": strategy != "ddp"},
    }  # fmt: skip


def run_case(backbone: str, case: str, steps: int, batch: int, seq: int, tmp: Path) -> dict:
    """Train one case in a subprocess; returns its figures."""
    strategy = {"single": "none", "half": "none", "ddp": "ddp", "fsdp2": "fsdp2"}[case]
    b = batch // 2 if case == "half" else batch
    path = tmp / f"{backbone}-{case}.yaml"
    path.write_text(yaml.safe_dump(recipe(backbone, steps, b, seq, strategy)))
    out = tmp / f"{backbone}-{case}"
    args = ["train", str(path), "--out", str(out), "--quiet"]
    if case in ("ddp", "fsdp2"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "bitblend", *args]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "bitblend", *args]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"{backbone}/{case} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("split") == "train"][2:]
    step_s = statistics.median(r["step_time_s"] for r in train)
    tokens = statistics.median(r["tokens"] for r in train)
    dist = summary.get("distributed", {})
    return {
        "backbone": backbone,
        "case": case,
        "batch": b,
        "load_1min": load,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "peak_memory_bytes_per_rank": dist.get("peak_memory_bytes_per_rank")
        or [summary["peak_memory_bytes"]],
        "model_state_bytes_per_rank": dist.get("model_state_bytes_per_rank")
        or [summary["model_state_bytes"]],
    }


def table(rows: list[dict]) -> str:
    """Markdown table of the figures, with ratios against the single process."""
    lines = [
        "| backbone | case | batch/rank | step s | comm+wait s | tokens/s | x single | "
        "peak MiB/rank | model state MiB/rank | x single |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["backbone"], r["case"]): r for r in rows}
    for r in rows:
        single, half = by[(r["backbone"], "single")], by.get((r["backbone"], "half"))
        two = r["case"] in ("ddp", "fsdp2")
        comm = f"{r['step_s'] - half['step_s']:.3f}" if two and half else "-"
        peak = "/".join(f"{p / 2**20:.0f}" for p in r["peak_memory_bytes_per_rank"])
        state = max(r["model_state_bytes_per_rank"])
        lines.append(
            f"| {r['backbone']} | {r['case']} | "
            f"{r['batch'] // (2 if r['case'] in ('ddp', 'fsdp2') else 1)} | "
            f"{r['step_s']:.3f} | {comm} | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s'] / single['tokens_per_s']:.2f} | {peak} | "
            f"{state / 2**20:.1f} | {state / max(single['model_state_bytes_per_rank']):.2f} |"
        )
    return "\n".join(lines)


def median_row(runs: list[dict]) -> dict:
    """One case's repeats as one row: medians of the times, the first run's memory."""
    return {
        **runs[0],
        "step_s": statistics.median(r["step_s"] for r in runs),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "load_1min": [r["load_1min"] for r in runs],
        "repeats": [{"step_s": r["step_s"], "tokens_per_s": r["tokens_per_s"]} for r in runs],
    }


def paired(runs: dict[str, list[dict]], case: str) -> list[float]:
    """tokens/s of `case` over `single` in the same repeat, one ratio per repeat."""
    pairs = zip(runs[case], runs["single"], strict=True)
    return [a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs]


def main() -> None:
    """Run every case of every backbone, print the table (and write JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="tiny-gpt,minilm")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--cases", default=",".join(CASES), help="a subset of " + ",".join(CASES))
    ap.add_argument("--repeats", type=int, default=1, help="interleaved runs of every case")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    cases = [c for c in CASES if c in args.cases.split(",")]
    if "single" not in cases:
        raise SystemExit("--cases must include single (the baseline of every ratio)")
    load0 = os.getloadavg()
    rows, ratios = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones.split(","):
            runs: dict[str, list[dict]] = {c: [] for c in cases}
            for i in range(args.repeats):
                for case in cases:
                    d = Path(tmp) / f"r{i}"
                    d.mkdir(exist_ok=True)
                    r = run_case(backbone, case, args.steps, args.batch, args.seq, d)
                    runs[case].append(r)
                    print(f"{backbone}/{case} #{i + 1}: {r['tokens_per_s']:.0f} tokens/s "
                          f"(load {r['load_1min']:.1f})", flush=True)  # fmt: skip
            rows += [median_row(runs[c]) for c in cases]
            for case in ("ddp", "fsdp2"):
                if case in cases:
                    ratios[f"{backbone}/{case}"] = paired(runs, case)
    load1 = os.getloadavg()
    print(table(rows))
    for name, rs in ratios.items():
        print(f"{name} / single, paired per repeat: median {statistics.median(rs):.2f}x "
              f"(" + ", ".join(f"{x:.2f}" for x in rs) + ")")  # fmt: skip
    print(f"\nload average (1 min) {load0[0]:.1f} before, {load1[0]:.1f} after; "
          f"{os.cpu_count()} cores; torch threads 1 per process")  # fmt: skip
    if args.json:
        out = {"rows": rows, "paired_ratios": ratios, "load": [load0, load1]}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
