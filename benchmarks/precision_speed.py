"""Training throughput and peak memory per precision recipe, measured in one run.

MiniLM-L6 on BBC News at batch 32 and sequence 128 (every article is longer than 128
tokens, so every batch is full length), through bitblend's own Trainer.train_step. Each
recipe runs in its own subprocess (so peak RSS is its own), in alternating rounds (so
machine noise hits every recipe alike); the median over rounds is reported.

    .venv/bin/python benchmarks/precision_speed.py [--rounds 2] [--steps 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RECIPES = ("32-true", "bf16-mixed", "bf16-true")


def measure(sets: list[str], steps: int, warmup: int, batch: int, seq: int) -> dict[str, Any]:
    """Run in a child process: tokens/s of `steps` timed train steps and peak RSS;
    `sets` are recipe overrides (e.g. precision.recipe=bf16-mixed)."""
    import resource

    import torch

    from bitblend.commands.common import quiet_libraries as _quiet_libraries
    from bitblend.config.load import load_recipe
    from bitblend.train.trainer import Trainer

    _quiet_libraries()
    recipe = load_recipe(
        "bbc",
        [
            *sets,
            f"train.batch_size={batch}",
            f"model.max_length={seq}",
            f"train.steps={warmup + steps}",
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(recipe, Path(tmp) / "run", show_progress=False)
        for _ in range(warmup):
            trainer.train_step()
        tokens = 0
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens += trainer.train_step()["tokens"]
        elapsed = time.perf_counter() - t0
    return {
        "precision": trainer.precision.name,
        "tokens_per_s": tokens / elapsed,
        "step_s": elapsed / steps,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    """Alternate the recipes over rounds, print medians and ratios to 32-true."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        sets = (
            json.loads(args.child)
            if args.child.startswith("[")
            else [f"precision.recipe={args.child}"]
        )
        print(json.dumps(measure(sets, args.steps, args.warmup, args.batch, args.seq)))
        return

    runs: dict[str, list[dict[str, float]]] = {r: [] for r in RECIPES}
    for rnd in range(args.rounds):
        for recipe in RECIPES:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                recipe,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            runs[recipe].append(res)
            print(
                f"round {rnd + 1} {recipe:<11} {res['tokens_per_s']:8.0f} tok/s "
                f"{res['step_s']:.2f} s/step peak {res['peak_rss_gib']:.2f} GiB",
                flush=True,
            )
    base = statistics.median(r["tokens_per_s"] for r in runs["32-true"])
    rows = []
    print(f"\nMiniLM-L6, batch {args.batch}, seq {args.seq}, median of {args.rounds} rounds")
    print(f"{'recipe':<11} {'tokens/s':>9} {'vs 32-true':>10} {'peak RSS GiB':>12}")
    for recipe, results in runs.items():
        tps = statistics.median(r["tokens_per_s"] for r in results)
        mem = statistics.median(r["peak_rss_gib"] for r in results)
        rows.append({"recipe": recipe, "tokens_per_s": tps, "ratio": tps / base, "peak_gib": mem})
        print(f"{recipe:<11} {tps:9.0f} {tps / base:9.2f}x {mem:12.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
