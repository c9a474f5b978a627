"""The four-modality recipe against each of its tasks trained alone (#20's mixing target).

`four-modalities` trains one MiniLM on text (BBC News), image (8x8 digits), audio
(SYNTHETIC spoken words) and tabular (breast cancer) tasks with one mixture. Each task is
then trained alone with the recipe's own settings and the same number of steps (so the
single-task model sees at least as many of its own examples as the mixture gives it), and
every task's eval accuracy is compared with its single-task run and its baseline (the
target: the mixture within 1 point of alone, or better, on every task).

    .venv/bin/python benchmarks/four_modalities.py [--steps 600] [--seed 0] [--json OUT]
        [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import yaml


def train(recipe: dict[str, Any], out: Path) -> dict[str, Any]:
    """One `bitblend train` of a recipe dict; returns its summary.json."""
    from bitblend.cli import main

    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe))
    code = main(["train", str(path), "--out", str(out), "--quiet"])
    if code != 0:
        raise SystemExit(f"{out.name}: bitblend train exited {code}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    """Train the mixture and each task alone; print the table."""
    from bitblend.config.load import apply_overrides, resolve_recipe_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for the mixture and every alone run (as train --set)",
    )
    args = p.parse_args()
    base = yaml.safe_load(resolve_recipe_path("four-modalities").read_text())
    base = apply_overrides(base, args.set)
    base["train"].update(steps=args.steps, seed=args.seed, eval_every=0)
    tmp = Path(tempfile.mkdtemp(prefix="four-modalities-"))
    mixed = train(base, tmp / "mixture")
    rows = []
    for task in base["tasks"]:
        alone = dict(base, name=f"alone-{task['name']}", tasks=[task])
        alone.pop("mixing", None)
        single = train(alone, tmp / f"alone-{task['name']}")
        name = task["name"]
        m, s = mixed["eval"][name], single["eval"][name]
        fit = ((mixed.get("baselines") or {}).get("tasks") or {}).get(name) or {}
        rows.append({"task": name, "mixture": m["accuracy"], "alone": s["accuracy"],
                     "baseline": (fit.get("metrics") or {}).get("accuracy"),
                     "mixture_steps": (mixed.get("task_steps") or {}).get(name)})  # fmt: skip
    alone = f"alone ({args.steps} steps)"
    head = f"| task | mixture (its steps) | {alone} | mixture - alone | baseline |"
    print(head)
    print("|---|---|---|---|---|")
    for r in rows:
        b = "-" if r["baseline"] is None else f"{r['baseline']:.3f}"
        diff = 100 * (r["mixture"] - r["alone"])
        mix = f"{r['mixture']:.3f} ({r['mixture_steps']})"
        print(f"| {r['task']} | {mix} | {r['alone']:.3f} | {diff:+.1f} pts | {b} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
