"""Real (non-pad) tokens/s of a causal-LM task packed vs padded per batch, in one process.

Alternating rounds (the order flips each round), the first 2 steps of each run untimed;
tokens are real tokens (metrics.jsonl's `tokens`), so padding earns nothing.

    python benchmarks/packing_ab.py [--backbone small-gpt] [--data election_tweets]
        [--max-length 128] [--steps 12] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def _run(args: argparse.Namespace, packing: bool) -> float:
    from bitblend.config.load import recipe_from_dict
    from bitblend.train.trainer import Trainer

    recipe = recipe_from_dict({
        "name": "packing-ab",
        "model": {"backbone": args.backbone, "max_length": args.max_length},
        "tasks": [{"name": "lm", "data": args.data, "head": "causal_lm", "packing": packing,
                   "max_examples": args.max_examples}],
        "precision": {"recipe": args.precision},
        "train": {"steps": args.steps, "batch_size": args.batch, "threads": 2,
                  "eval_max_examples": 8},
    })  # fmt: skip
    trainer = Trainer(recipe, Path(tempfile.mkdtemp()) / "run", show_progress=False)
    records = [trainer.train_step() for _ in range(args.steps)][2:]
    return sum(r["tokens"] for r in records) / sum(r["step_time_s"] for r in records)


def main() -> int:
    """Alternate packed and padded runs; print real tokens/s of each and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="small-gpt")
    ap.add_argument("--data", default="election_tweets")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--max-examples", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", default="32-true")
    args = ap.parse_args()
    rates: dict[str, list[float]] = {"packed": [], "padded": []}
    for r in range(args.rounds):
        for packing in (True, False) if r % 2 == 0 else (False, True):
            rate = _run(args, packing)
            rates["packed" if packing else "padded"].append(rate)
            print(f"round {r} {'packed' if packing else 'padded'}: {rate:.0f} tokens/s", flush=True)
    ratio = statistics.median(rates["packed"]) / statistics.median(rates["padded"])
    print(json.dumps({**rates, "packed_vs_padded": ratio}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
