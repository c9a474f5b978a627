"""Single-task vs mixture strategies vs simple baselines on the demo tasks, and the sampler's
share of step time.

At equal total compute: each single-task model trains its demo task alone for `--steps`
steps (MiniLM-L6, auto precision); each mixture trains one model on all k tasks for
k x `--steps` steps, the sum of the single-task budgets. Beside them, each task's
scikit-learn baseline (train.baselines) on the same split. Reported per strategy: each
task's main metric (accuracy; AUC-free so every task is comparable), their mean and the
worst task. Then the mixture + sampler cost per step against the measured step time.

    .venv/bin/python benchmarks/mixing_study.py [--steps 150] [--seeds 0,1,2] [--set KEY=VALUE]
        [--strategies temperature] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

STRATEGIES = ("proportional", "temperature", "dynamic")


def run(overrides: list[str], out: Path) -> dict[str, Any]:
    """Train the demo recipe with overrides; returns summary.json."""
    from bitblend.cli import main

    code = main(["train", "demo", "--out", str(out), "--quiet", *(f"--set={o}" for o in overrides)])
    assert code == 0, overrides
    return json.loads((out / "summary.json").read_text())


def sampler_cost(steps: int = 10_000) -> float:
    """Seconds per step spent choosing tasks and drawing example indices (5 sources)."""
    from bitblend.config.schema import MixingConfig
    from bitblend.data.mixture import Mixture
    from bitblend.data.sampler import BatchSampler

    sizes = [2002, 4936, 5799, 1617, 512]
    rng = np.random.default_rng(0)
    samplers = [BatchSampler(rng.integers(5, 128, n), 32, 0, i) for i, n in enumerate(sizes)]
    mix = Mixture(MixingConfig(strategy="temperature"), list("abcde"), sizes, 0, steps)
    t0 = time.perf_counter()
    for s in range(steps):
        samplers[mix.task_at(s)].next()
    homogeneous = (time.perf_counter() - t0) / steps
    mixed_mix = Mixture(MixingConfig(strategy="temperature"), list("abcde"), sizes, 0, steps)
    t0 = time.perf_counter()
    for s in range(steps):
        for i, k in enumerate(mixed_mix.allocate(s, 32)):
            if k:
                samplers[i].take(k)
    mixed = (time.perf_counter() - t0) / steps
    return max(homogeneous, mixed)


def study(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One seed: each task alone for --steps, then each strategy on all tasks for the sum."""
    from bitblend.config.load import apply_overrides, load_recipe, recipe_to_dict

    common = [f"train.eval_max_examples={args.eval}", "train.eval_every=0",
              "mixing.dynamic_every=25", *args.set, f"train.seed={seed}"]  # fmt: skip
    results: dict[str, dict[str, float]] = {}
    baselines: dict[str, float] = {}
    names: dict[str, str] = {}
    step_times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        # The demo with the --set overrides applied: its tasks are the study's tasks.
        demo = recipe_to_dict(load_recipe("demo"))
        tasks_cfg = apply_overrides(demo, list(args.set))["tasks"]
        tasks = [t["name"] for t in tasks_cfg]
        single: dict[str, float] = {}
        for i, name in enumerate(tasks):
            keep = [f"train.steps={args.steps}", f"tasks={json.dumps([tasks_cfg[i]])}"]
            s = run(common + keep, Path(tmp) / f"single-{name}")
            single[name] = s["eval"][name]["accuracy"]
            base = s.get("baselines", {}).get("tasks", {}).get(name, {})
            if base.get("model"):
                baselines[name], names[name] = float(base["value"]), str(base["model"])
            step_times.append(s["train_time_s"] / s["steps"])
            print(f"seed {seed} single {name}: {single[name]:.4f}  baseline "
                  f"{baselines.get(name, float('nan')):.4f}", flush=True)  # fmt: skip
        results["single-task"] = single
        # Equal total compute: one mixture gets the sum of the single-task budgets.
        mix_steps = args.steps * len(tasks)
        for strategy in args.strategies.split(","):
            sets = [*common, f"train.steps={mix_steps}", f"mixing.strategy={strategy}"]
            s = run(sets, Path(tmp) / strategy)
            results[strategy] = {n: s["eval"][n]["accuracy"] for n in tasks}
            step_times.append(s["train_time_s"] / s["steps"])
            print(f"seed {seed} {strategy}: {results[strategy]}", flush=True)
    return {"tasks": tasks, "results": results, "baselines": baselines, "baseline_models": names,
            "step_times": step_times, "mixture_steps": mix_steps}  # fmt: skip


def table(tasks: list[str], rows: dict[str, dict[str, float]], baselines: dict[str, float]) -> None:
    """Per task accuracy of each run, mean and worst; the baseline row; each run's gap to
    the single-task models (points, per task)."""
    print(f"{'run':<13}" + "".join(f"{n[:14]:>15}" for n in tasks) + f"{'mean':>8}{'worst':>8}")
    for run_name, res in rows.items():
        vals = [res[n] for n in tasks]
        print(f"{run_name:<13}" + "".join(f"{v:15.4f}" for v in vals)
              + f"{np.mean(vals):8.4f}{min(vals):8.4f}")  # fmt: skip
    print(f"{'baseline':<13}" + "".join(f"{baselines.get(n, float('nan')):15.4f}" for n in tasks))
    for run_name, res in rows.items():
        if run_name == "single-task":
            continue
        gap = [100 * (res[n] - rows["single-task"][n]) for n in tasks]
        print(f"{run_name + ' - single':<13}" + "".join(f"{g:+15.1f}" for g in gap))


def main() -> None:
    """Run the study (one or more seeds) and print the tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="steps of each single-task run")
    p.add_argument("--eval", type=int, default=300, help="eval examples per task")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--seeds", default="0", help="comma-separated train.seed values; mean over them")
    p.add_argument("--set", action="append", default=[], help="recipe override for every run")
    p.add_argument("--json")
    args = p.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    per_seed = {seed: study(args, seed) for seed in seeds}
    first = per_seed[seeds[0]]
    tasks = first["tasks"]
    print(
        f"\naccuracy: single-task {args.steps} steps each, mixtures {first['mixture_steps']} "
        "steps (the sum: equal total compute); baseline = scikit-learn on the same split"
    )
    for seed, r in per_seed.items():
        print(f"\nseed {seed}")
        table(tasks, r["results"], r["baselines"])
    if len(seeds) > 1:
        mean_rows = {k: {n: float(np.mean([per_seed[s]["results"][k][n] for s in seeds]))
                         for n in tasks} for k in first["results"]}  # fmt: skip
        have = [n for n in tasks if all(n in per_seed[s]["baselines"] for s in seeds)]
        mean_base = {n: float(np.mean([per_seed[s]["baselines"][n] for s in seeds])) for n in have}
        print(f"\nmean of seeds {args.seeds}")
        table(tasks, mean_rows, mean_base)
    cost = sampler_cost()
    step = statistics.median([t for r in per_seed.values() for t in r["step_times"]])
    print(
        f"\nsampler + mixture: {cost * 1e6:.1f} us/step; median step {step:.3f} s; "
        f"share {cost / step:.5%}"
    )
    if args.json:
        out = {"seeds": {str(k): v for k, v in per_seed.items()}, "sampler_s": cost,
               "step_s": step, "steps": args.steps}  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
