"""A/B of bitblend's Llama step options in one process, alternating rounds (ratios hold on a
shared machine better than separate runs): compiled vs eager blocks, bitblend's attention
kernel vs torch's SDPA (`model.kernels=torch`), precisions.

Each variant is a Trainer on the same recipe as benchmarks/llm_pretrain.py (packed BBC
News, AdamW, constant rate), or on `--recipe`, with `--set`-style overrides. After two
warm-up steps each (compilation included), rounds of `--steps` steps run variant after
variant; the table gives the median seconds per step and its ratio to the first variant.

    python benchmarks/llm_step_ab.py [--size llama-30m] [--seq 512] [--batch 8] [--rounds 4]
        --variant eager "model.compile=eager" --variant compiled "model.compile=blocks" \\
        --variant sdpa "model.kernels=torch"
    python benchmarks/llm_step_ab.py --recipe pretrain-mix --steps 5 \\
        --variant 8bit "" --variant 32bit "precision.state_bits=32"   # a recipe as it is
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]


def _trainer(args: argparse.Namespace, sets: list[str]) -> Any:
    from bitblend.config.load import (
        apply_overrides,
        read_yaml,
        recipe_from_dict,
        resolve_recipe_path,
    )
    from bitblend.train.trainer import Trainer

    if args.recipe:  # a recipe as it is (its own model, data, precision), steps unbounded
        data = read_yaml(resolve_recipe_path(args.recipe))
        data.setdefault("train", {})["steps"] = 10_000
        data = apply_overrides(data, sets)
        return Trainer(
            recipe_from_dict(data), Path(tempfile.mkdtemp()) / "run", show_progress=False
        )
    data = {
        "name": "llm-step-ab",
        "model": {"backbone": args.size, "max_length": args.seq, "vocab_size": 8192},
        "tasks": [{"name": "lm", "data": "bbc_news", "head": "causal_lm", "packing": True}],
        "precision": {"recipe": "bf16-mixed"},
        "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
        "schedule": {"name": "constant", "warmup_ratio": 0.0},
        "train": {"steps": 10_000, "batch_size": args.batch, "max_grad_norm": 1.0, "seed": 0,
                  "group_by_length": False},
    }  # fmt: skip
    data = apply_overrides(data, sets)
    trainer = Trainer(recipe_from_dict(data), Path(tempfile.mkdtemp()) / "run", show_progress=False)
    return trainer


def main() -> int:
    """Build every variant, warm each up, time alternating rounds, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="llama-30m")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipe", help="a built-in recipe or YAML file instead of the Llama setup")
    ap.add_argument(
        "--variant", nargs=2, action="append", metavar=("NAME", "SETS"), required=True,
        help="a name and comma-separated overrides ('' for none)",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = {}
    for name, sets in args.variant:
        trainer = _trainer(args, [s for s in sets.split(",") if s])
        t0 = time.perf_counter()
        for _ in range(2):
            trainer.train_step()
        print(f"{name}: warm-up {time.perf_counter() - t0:.1f} s ({trainer.compile_reason})")
        variants[name] = trainer
    times: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(args.rounds):
        for name, trainer in variants.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step()
            times[name].append((time.perf_counter() - t0) / args.steps)
    first = statistics.median(next(iter(times.values())))
    print("| variant | s/step (rounds) | median | vs first |\n|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        rounds = " / ".join(f"{t:.2f}" for t in ts)
        print(f"| {name} | {rounds} | {med:.2f} | {first / med:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
