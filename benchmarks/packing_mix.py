"""Packing on a whole pre-training recipe: real tokens/s and loss per token, packed vs not.

The recipe (default `pretrain-mix`) is built twice in one process: once as shipped (its
causal-LM tasks packed) and once with `packing: false` on every task (each document its
own row, truncated at `model.max_length`, batches padded to their longest row). Everything
else is the recipe's: model, tokenizer, mixture, precision, optimizer, batch size, seed.
The mixture's shares follow each run's sizes (rows packed, documents unpacked), as they do
for a user who turns packing off.

The two trainers step in turns: one packed step, then unpacked steps until the unpacked
run has trained on at least as many real (non-pad) tokens. So both see the same machine
load at the same moments, and both end on the same number of tokens. tokens/s is real
tokens over the step time of all steps but each run's first `--warmup` (compilation).
Both use a constant learning rate after `--warmup-steps` of warmup (a decay tied to step
counts would differ between runs of different step counts).

Loss per token after the same tokens, in the recipe's precision, on two validation sets:
- `documents`: the unpacked run's eval split, every document alone from its first token
  (truncated at max_length), the same rows for both models;
- `packed`: the packed run's eval split (documents packed into full rows).
Per domain and the token-weighted mean over domains.

    python benchmarks/packing_mix.py [--recipe pretrain-mix] [--steps 300] [--warmup 3]
        [--warmup-steps 15] [--set KEY=VALUE ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

# Run as a script, benchmarks/ is sys.path[0]: its peft.py would shadow the peft package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]


def _trainer(base: dict[str, Any], packing: bool, args: argparse.Namespace) -> Any:
    from bitblend.config.load import recipe_from_dict
    from bitblend.train.trainer import Trainer

    d = copy.deepcopy(base)
    for task in d["tasks"]:
        task["packing"] = packing
    d.setdefault("train", {})["steps"] = args.steps * 4  # a bound: the loop below decides
    d["schedule"] = {"name": "constant", "warmup_steps": args.warmup_steps}
    run = Path(tempfile.mkdtemp()) / ("packed" if packing else "unpacked")
    return Trainer(recipe_from_dict(d), run, show_progress=False)


def _losses(model: Any, trainer: Any, limit: int | None) -> dict[str, dict[str, float]]:
    """Loss per token and token count of `model` on `trainer`'s eval splits."""
    from bitblend.train.evaluate import evaluate_split

    out = {}
    for t in trainer.tasks:
        res = evaluate_split(model, t.name, t.eval, t.batch, t.loss, limit)
        out[t.name] = {"loss": res["loss"], "tokens": res["tokens"]}
    return out


def _mean(per_task: dict[str, dict[str, float]]) -> float:
    tokens = sum(v["tokens"] for v in per_task.values())
    return sum(v["loss"] * v["tokens"] for v in per_task.values()) / tokens


def main() -> int:
    """Train both runs to the same real tokens; print tokens/s, losses and their ratios."""
    from bitblend.config.load import apply_overrides, read_yaml, resolve_recipe_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="pretrain-mix")
    ap.add_argument("--steps", type=int, default=300, help="packed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps of each run")
    ap.add_argument("--warmup-steps", type=int, default=15, help="lr warmup of both runs")
    ap.add_argument("--eval-max-examples", type=int, default=None)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for both runs, e.g. model.max_length=512",
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    base = apply_overrides(read_yaml(resolve_recipe_path(args.recipe)), args.set)
    packed, unpacked = _trainer(base, True, args), _trainer(base, False, args)
    sample = "def main():\n    return 'BBC 新闻'  # tokens"
    if packed.tokenizer.encode(sample) != unpacked.tokenizer.encode(sample):
        raise SystemExit("the two runs trained different tokenizers: losses not comparable")
    runs = {"packed": packed, "unpacked": unpacked}
    tokens = dict.fromkeys(runs, 0)
    timed = {k: {"tokens": 0, "time": 0.0, "steps": 0} for k in runs}

    def step(name: str) -> None:
        record = runs[name].train_step()
        tokens[name] += record["tokens"]
        if runs[name].step > args.warmup:
            timed[name]["tokens"] += record["tokens"]
            timed[name]["time"] += record["step_time_s"]
            timed[name]["steps"] += 1

    for i in range(args.steps):
        step("packed")
        while tokens["unpacked"] < tokens["packed"]:
            step("unpacked")
        if (i + 1) % 50 == 0:
            print(f"packed step {i + 1}: {tokens} tokens", file=sys.stderr, flush=True)
    rates = {k: v["tokens"] / v["time"] for k, v in timed.items()}
    limit = args.eval_max_examples or base.get("train", {}).get("eval_max_examples")
    losses = {
        split: {name: _losses(runs[name].model, src, limit) for name in runs}
        for split, src in (("documents", unpacked), ("packed", packed))
    }
    result = {
        "recipe": args.recipe,
        "set": args.set,
        "steps": {k: runs[k].step for k in runs},
        "tokens": tokens,
        "timed": timed,
        "tokens_per_s": rates,
        "packed_vs_unpacked": rates["packed"] / rates["unpacked"],
        "loss": {
            split: {name: {"mean": _mean(v), "tasks": v} for name, v in by_run.items()}
            for split, by_run in losses.items()
        },
    }
    for split in losses:
        mean = {name: result["loss"][split][name]["mean"] for name in runs}
        result[f"loss_{split}_packed_vs_unpacked"] = mean["packed"] / mean["unpacked"]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
