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
The machine's load average is printed with the figures: on a shared machine they are only
comparable within one run.

    .venv/bin/python benchmarks/scaling.py [--backbones tiny-gpt,minilm] [--steps 20]
        [--batch 16] [--seq 128] [--json OUT]
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
        "distributed": {"strategy": strategy},
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
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"{backbone}/{case} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("split") == "train"][2:]
    step_s = statistics.median(r["tokens"] / r["tokens_per_s"] for r in train)
    tokens = statistics.median(r["tokens"] for r in train)
    dist = summary.get("distributed", {})
    return {
        "backbone": backbone,
        "case": case,
        "batch": b,
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
        single, half = by[(r["backbone"], "single")], by[(r["backbone"], "half")]
        comm = f"{r['step_s'] - half['step_s']:.3f}" if r["case"] in ("ddp", "fsdp2") else "-"
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


def main() -> None:
    """Run every case of every backbone, print the table (and write JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="tiny-gpt,minilm")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    load0 = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones.split(","):
            for case in CASES:
                rows.append(run_case(backbone, case, args.steps, args.batch, args.seq, Path(tmp)))
                print(f"{backbone}/{case}: {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    load1 = os.getloadavg()
    print(table(rows))
    print(f"\nload average (1 min) {load0[0]:.1f} before, {load1[0]:.1f} after; "
          f"{os.cpu_count()} cores; torch threads 1 per process")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "load": [load0, load1]}, indent=2))


if __name__ == "__main__":
    main()
