"""Crash trials: kill -9 a training run at a random moment, resume it, compare bit for bit.

Each trial starts `bitblend train` on a tiny recipe in a subprocess and kills it with
SIGKILL at a moment drawn at random from:
- a random time after start (anywhere: imports, data loading, training, saving);
- a short random delay after the k-th metrics row (anywhere inside training);
- a named point the run passes (BITBLEND_CRASH_AT, see bitblend/fsutil.py): half way
  through a checkpoint write, just before its rename, in the middle of pruning, half way
  through a metrics line, or after the last checkpoint; the n-th pass is drawn at random,
  and an n the run never reaches lets it finish (then the resume is of a finished run).
The run is then continued with `bitblend train --resume` (or started again with `--out`
when it died before writing recipe.yaml) and compared with one uninterrupted run of the same
recipe: the final weights (model/ and the last checkpoint's weights and optimizer state),
every metrics.jsonl row (all fields but the wall-clock `tokens_per_s` and `step_time_s`),
eval.json, the list of checkpoints, and that no temp, half-pruned or lock file is left.

    .venv/bin/python benchmarks/crash_trials.py      # 20 fp32 + 5 bf16 + 3 multi-task
    .venv/bin/python benchmarks/crash_trials.py --trials fp32=3 --seed 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file

# A 12-step tiny-bert run that checkpoints every 3 steps and keeps 2: saves at 3, 6, 9, 12
# and prunes twice, so every kind of moment happens several times in ~10 s of training.
BASE: dict[str, Any] = {
    "model": {"backbone": "tiny-bert", "max_length": 32},
    "tasks": [{"name": "bbc_news", "data": "bbc_news", "max_examples": 256}],
    "precision": {"recipe": "32-true"},
    "optimizer": {"name": "adamw", "lr": 1.0e-3},
    "train": {
        "steps": 12, "batch_size": 8, "eval_every": 4, "eval_max_examples": 32,
        "checkpoint_every": 3, "keep_checkpoints": 2, "threads": 1,
    },
}  # fmt: skip
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {},
    # pure bf16 weights with stochastic rounding: the SR generator must resume exactly too
    "bf16": {
        "precision": {"recipe": "bf16-true", "rounding": "stochastic", "master_weights": False}
    },
    "multitask": {
        "tasks": [
            {"name": "bbc_news", "data": "bbc_news", "max_examples": 256},
            {"name": "tweets", "data": "election_tweets", "max_examples": 256},
        ],
        "mixing": {"strategy": "temperature", "batches": "mixed"},
    },
}
POINTS = [  # (BITBLEND_CRASH_AT point, how many times a 12-step run passes it)
    ("save:model-written", 4),
    ("save:before-rename", 4),
    ("prune:aside", 2),
    ("metrics:torn", 12),
    ("run:after-final-checkpoint", 1),
]
VOLATILE = {"tokens_per_s", "step_time_s", "data_wait"}  # wall-clock fields of a metrics row


def recipe(variant: str) -> dict[str, Any]:
    """The tiny recipe of a variant."""
    data = json.loads(json.dumps(BASE))
    for key, value in VARIANTS[variant].items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    data["name"] = f"crash-{variant}"
    return data


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BITBLEND_CRASH_AT"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**env, **(extra or {})}


def train(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`bitblend train ARGS --quiet` in a subprocess."""
    cmd = [sys.executable, "-m", "bitblend.cli", "train", *args, "--quiet"]
    return subprocess.Popen(cmd, env=env or _env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _rows(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


@dataclass
class Trial:
    """One kill-and-resume trial and what it found."""

    variant: str
    moment: str  # "timer 7.3s", "row 5 +0.12s", or "point save:before-rename#2"
    killed: bool = False
    restarted_fresh: bool = False  # died before recipe.yaml existed: started again with --out
    resume_rc: int = 0
    differences: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def identical(self) -> bool:
        """Bit-identical to the uninterrupted run."""
        return self.resume_rc == 0 and not self.differences


def draw_moment(rng: random.Random, straight_s: float, steps: int) -> tuple[str, Any]:
    """A random kill moment: ("timer", seconds) | ("rows", (k, delay)) | ("point", spec)."""
    kind = rng.choice(["timer", "rows", "point", "point"])
    if kind == "timer":
        return "timer", rng.uniform(0.5, straight_s)
    if kind == "rows":
        return "rows", (rng.randint(1, steps), rng.uniform(0.0, 0.5))
    point, passes = rng.choice(POINTS)
    return "point", f"{point}:{rng.randint(1, passes + 1)}"  # passes + 1: never reached


def run_trial(
    variant: str, recipe_path: Path, out: Path, moment: tuple[str, Any], straight: Path
) -> Trial:
    """Kill a run at `moment`, resume it, compare it with `straight`."""
    kind, value = moment
    label = {"timer": f"timer {value:.1f}s" if kind == "timer" else "",
             "rows": f"row {value[0]} +{value[1]:.2f}s" if kind == "rows" else "",
             "point": f"point {value}"}[kind]  # fmt: skip
    trial = Trial(variant, label)
    t0 = time.perf_counter()
    env = _env({"BITBLEND_CRASH_AT": value} if kind == "point" else None)
    proc = train([str(recipe_path), "--out", str(out)], env)
    if kind == "timer":
        try:
            proc.wait(timeout=value)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    elif kind == "rows":
        k, delay = value
        while proc.poll() is None and _rows(out / "metrics.jsonl") < k:
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    trial.killed = proc.returncode == -signal.SIGKILL
    if not trial.killed and proc.returncode != 0:
        trial.differences.append(f"first leg exited {proc.returncode}: {err.strip()[-300:]}")
        return trial
    if (out / "recipe.yaml").is_file():
        again = train(["--resume", str(out)])
    else:
        trial.restarted_fresh = True
        again = train([str(recipe_path), "--out", str(out)])
    _, err = again.communicate()
    trial.resume_rc = again.returncode
    if again.returncode != 0:
        trial.differences.append(f"resume exited {again.returncode}: {err.strip()[-300:]}")
    else:
        trial.differences = compare(straight, out)
    trial.seconds = time.perf_counter() - t0
    return trial


def _tensors(a: Path, b: Path, what: str) -> list[str]:
    if not b.is_file():
        return [f"{what}: missing"]
    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        return [f"{what}: different tensor names"]
    return [f"{what}: {k} differs" for k in ta if not ta[k].equal(tb[k])][:3]


def _metrics(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def compare(straight: Path, run: Path) -> list[str]:
    """Every way `run` differs from the uninterrupted `straight` run (empty: bit-identical)."""
    diffs: list[str] = []
    for f in sorted((straight / "model").glob("*.safetensors")):
        diffs += _tensors(f, run / "model" / f.name, f"model/{f.name}")
    want = sorted(p.name for p in (straight / "checkpoints").iterdir())
    got = sorted(p.name for p in (run / "checkpoints").iterdir())
    if got != want:
        diffs.append(f"checkpoints: {got} instead of {want}")
    last = want[-1]
    for name in ("model.safetensors", "state.safetensors"):
        diffs += _tensors(straight / "checkpoints" / last / name,
                          run / "checkpoints" / last / name, f"{last}/{name}")  # fmt: skip
    a, b = _metrics(straight / "metrics.jsonl"), _metrics(run / "metrics.jsonl")
    if a != b:
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        diffs.append(f"metrics.jsonl: {len(b)} rows vs {len(a)}, first difference at row {first}")
    ea, eb = (json.loads((d / "eval.json").read_text()) for d in (straight, run))
    if ea != eb:
        diffs.append("eval.json differs")
    leftovers = [p.name for p in [*run.iterdir(), *(run / "checkpoints").iterdir()]
                 if p.name.startswith(".")]  # fmt: skip
    if leftovers:
        diffs.append(f"left behind: {leftovers}")
    return diffs


def run_trials(counts: dict[str, int], seed: int, workdir: Path, log: Any = print) -> list[Trial]:
    """`counts[variant]` trials per variant; returns them all."""
    rng = random.Random(seed)
    trials: list[Trial] = []
    for variant, n in counts.items():
        if not n:
            continue
        recipe_path = workdir / f"{variant}.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe(variant)))
        straight = workdir / f"{variant}-straight"
        t0 = time.perf_counter()
        proc = train([str(recipe_path), "--out", str(straight)])
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"the uninterrupted {variant} run failed: {err.strip()[-500:]}")
        straight_s = time.perf_counter() - t0
        log(f"{variant}: uninterrupted run {straight_s:.1f}s", flush=True)
        for i in range(n):
            moment = draw_moment(rng, straight_s, int(BASE["train"]["steps"]))
            trial = run_trial(variant, recipe_path, workdir / f"{variant}-{i}", moment, straight)
            trials.append(trial)
            state = (
                "bit-identical" if trial.identical else "DIFFERENT: " + "; ".join(trial.differences)
            )
            how = "killed" if trial.killed else "finished"
            fresh = ", restarted fresh" if trial.restarted_fresh else ""
            log(f"  {variant} #{i}: {trial.moment}: {how}{fresh}, resumed -> {state}", flush=True)
    return trials


def main() -> None:
    """Run the trials and print one line per trial plus the total."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", default="fp32=20,bf16=5,multitask=3",
                    help="variant=count,... (variants: " + ", ".join(VARIANTS) + ")")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep the runs here (default: a temp dir, deleted)")
    ap.add_argument("--json", help="write the trials to this JSON file")
    args = ap.parse_args()
    counts = {k: int(v) for k, v in (x.split("=") for x in args.trials.split(","))}
    unknown = set(counts) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--trials: unknown variant(s) {sorted(unknown)}")
    with tempfile.TemporaryDirectory(prefix="crash-trials-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        trials = run_trials(counts, args.seed, workdir)
    same = sum(t.identical for t in trials)
    killed = sum(t.killed for t in trials)
    print(f"{same}/{len(trials)} trials bit-identical after resume ({killed} killed by SIGKILL, "
          f"{len(trials) - killed} ran to the end first)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(t) for t in trials], indent=2))
    if same != len(trials):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
