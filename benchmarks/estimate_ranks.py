"""`bitblend estimate --ranks N` against measured torchrun runs: per-rank peak memory and
model state under ddp and fsdp2 (#16 item 7).

For each strategy, one `bitblend train RECIPE --nproc N` (torchrun, gloo on CPU) of the
`bbc` recipe with --set overrides writes summary.json with each rank's peak RSS and
model-state bytes; `bitblend estimate --ranks N --json` runs in its own fresh process (its
resident runtime is what a user's estimate sees) and gives each strategy's per-rank tensor
peak, process peak, model state and bytes sent per step. Memory is what this compares:
on a shared 2-core machine time is not.

    .venv/bin/python benchmarks/estimate_ranks.py [--ranks 2] [--backbone minilm]
        [--precision bf16-mixed] [--batch 16] [--seq 64] [--steps 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def sets(args: argparse.Namespace, strategy: str) -> list[str]:
    """--set overrides of the `bbc` recipe for one run."""
    out = [
        f"model.backbone={args.backbone}",
        f"precision.recipe={args.precision}",
        f"train.batch_size={args.batch}",
        f"model.max_length={args.seq}",
        f"train.steps={args.steps}",
        "train.eval_every=0",
        "train.eval_max_examples=64",
        f"distributed.strategy={strategy}",
    ]
    return [x for s in out for x in ("--set", s)]


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """`bitblend ARGV` in a fresh process; a failure stops the benchmark with its stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "bitblend.cli", *argv], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"bitblend {' '.join(argv)} failed:\n{proc.stderr[-4000:]}")
    return proc


def measure(args: argparse.Namespace, strategy: str, out: Path) -> dict[str, Any]:
    """Train with torchrun on `args.ranks` processes; each rank's peak RSS and model state."""
    cli("train", "bbc", "--nproc", str(args.ranks), "--out", str(out), "--quiet",
        *sets(args, strategy))  # fmt: skip
    dist = json.loads((out / "summary.json").read_text())["distributed"]
    return {
        "peak_rss_per_rank": dist["peak_memory_bytes_per_rank"],
        "model_state_per_rank": dist["model_state_bytes_per_rank"],
    }


def estimate(args: argparse.Namespace, strategy: str) -> dict[str, Any]:
    """The estimate's figures for `strategy` at `args.ranks` ranks."""
    proc = cli("estimate", "bbc", "--json", "--precision", "recipe", "--ranks",
               str(args.ranks), *sets(args, strategy))  # fmt: skip
    est = json.loads(proc.stdout)
    row = est["rows"][0]
    rank = next(r for r in row["per_rank"] if r["strategy"] == strategy)
    m = row["memory"]
    state = m["weights"] + m["grads"] + m["master"] + m["optimizer_states"]
    return {
        "process_peak": rank["process_peak"],
        "tensor_peak": rank["peak"],
        "comm_bytes": rank["comm_bytes"],
        "batch_per_rank": rank["batch"],
        "model_state": state if strategy == "ddp" else state / args.ranks,
        "runtime_bytes": est["runtime_bytes"],
    }


def main() -> None:
    """Measure and estimate each strategy; print a Markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--strategies", default="ddp,fsdp2")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies.split(","):
            run = measure(args, strategy, Path(tmp) / strategy)
            est = estimate(args, strategy)
            measured = max(run["peak_rss_per_rank"])
            row = {
                "strategy": strategy,
                **run,
                "estimate": est,
                "memory_error": est["process_peak"] / measured - 1,
                "state_error": est["model_state"] / max(run["model_state_per_rank"]) - 1,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    mib = 2**20
    print(f"\n{args.backbone} {args.precision}, global batch {args.batch} x {args.seq}, "
          f"{args.ranks} ranks (torchrun, gloo)\n")  # fmt: skip
    print("| strategy | measured peak RSS per rank MiB | estimate MiB | error (target 10%) "
          "| model state per rank MiB measured / estimate | sends per step MiB |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        e = r["estimate"]
        print(
            f"| {r['strategy']} | {max(r['peak_rss_per_rank']) / mib:.0f} | "
            f"{e['process_peak'] / mib:.0f} | {r['memory_error']:+.1%} | "
            f"{max(r['model_state_per_rank']) / mib:.1f} / {e['model_state'] / mib:.1f} | "
            f"{e['comm_bytes'] / mib:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
