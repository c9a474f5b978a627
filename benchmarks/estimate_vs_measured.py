"""`bitblend estimate` against measurement: peak RSS and step time of real training steps.

Each case (backbone x precision x batch x sequence) runs in its own subprocess through
bitblend's own Trainer.train_step on BBC News (the `bbc` recipe with --set overrides; every
article is longer than 128 tokens, so every batch is full length). The child records its
peak RSS after the timed steps, then probes this machine's peaks (the estimate's inputs)
right away, so the estimate and the measurement see the same load from other processes.

The runtime baseline is measured the same way by a child that does everything `train` does
before it builds the model - imports (python, torch, transformers, datasets), the recipe,
the data and its tokenisation - and nothing after; the estimate's process peak is that
baseline plus its own tensor peak with the CPU allocator slack. Cases run in alternating
rounds; medians are reported. Accelerate's `estimate-memory` is compared on MiniLM.

    .venv/bin/python benchmarks/estimate_vs_measured.py [--rounds 2] [--json OUT]
        [--threads 0 --clock wall]   # all cores, wall time: only on an otherwise idle machine
    .venv/bin/python benchmarks/estimate_vs_measured.py --user [--json OUT]
        # users' recipes: whole runs (train + evals) on files, own vocabularies, a mixture
    .venv/bin/python benchmarks/estimate_vs_measured.py --phases bbc --set K=V ...
        # one whole `train` (a built-in recipe, or user:CASE), peak RSS and malloc's live
        # bytes per phase: setup parts, steps, evals, checkpoints, save, report

The `--user` cases are recipes as a user writes them (#22): files written from packaged data
(BBC News with a large eval file; Chinese reviews with Chinese column names and an
own-vocabulary WordPiece tokenizer; a four-task mixture of them with Reuters R8 and the 2016
election tweets), evaluated every few steps. Each case runs `bitblend estimate` in one fresh
process (its runtime baseline: imports, data and tokenizer, as a user's estimate sees them)
and the whole `bitblend train` in another, and compares peak RSS with the estimate's process
peak (target: within 10%) and the run's train + eval time with the estimate's whole-run time
(target: within 25%; wall clock: run it on an otherwise idle machine).

By default each case runs on one thread and its steps and probe are timed in process CPU
seconds, which other processes on a shared machine cannot inflate (with several threads
that contend with other processes for the cores, wall times swing by 10x here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bitblend.procmem import peak_rss_bytes

CASES = [
    (backbone, precision, batch, seq)
    for backbone in ("minilm", "tiny-bert")
    for precision in ("32-true", "bf16-mixed")
    for batch, seq in ((8, 64), (32, 128))
] + [("minilm", "32-true", 8, 128), ("minilm", "bf16-mixed", 32, 64)]
MIN_SECONDS = 2.0
MAX_STEPS = 60
# Users' recipes (--user): name -> (backbone, steps, eval_every); their data in user_files().
USER_CASES = {
    "large-eval-file": ("minilm", 12, 6),
    "own-vocab-chinese": ("minilm", 12, 6),
    "four-task-mixture": ("minilm", 16, 8),
}


def overrides(
    backbone: str, precision: str, batch: int, seq: int, steps: int, threads: int = 0
) -> list[str]:
    """--set overrides of the `bbc` recipe for one case (threads 0: all cores)."""
    return [
        f"train.threads={threads or 'null'}",
        f"model.backbone={backbone}",
        f"precision.recipe={precision}",
        f"train.batch_size={batch}",
        f"model.max_length={seq}",
        f"train.steps={steps}",
    ]


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bitblend.commands.common import quiet_libraries as _quiet_libraries

    _quiet_libraries()


def child_case(
    case: list[str], steps: int, warmup: int, threads: int, clock_name: str
) -> dict[str, Any]:
    """In a fresh process: time `steps` train steps, then peak RSS, then probe the peaks."""
    _quiet()
    from bitblend.config.load import load_recipe
    from bitblend.estimate.probe import measure
    from bitblend.train.trainer import Trainer

    # cpu: this process's CPU seconds, which other processes cannot inflate (one thread only)
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    backbone, precision, batch, seq = case[0], case[1], int(case[2]), int(case[3])
    recipe = load_recipe("bbc", overrides(backbone, precision, batch, seq, warmup + steps, threads))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(recipe, Path(tmp) / "run", show_progress=False)
        trainer.model.train()  # as fit() does: dropout on, as in a real run
        for _ in range(warmup):
            trainer.train_step()
        times, tokens = [], []
        # At least `steps` steps and about MIN_SECONDS of them (tiny models step in
        # milliseconds: their best of many is what a busy machine lets through).
        end = time.perf_counter() + MIN_SECONDS
        while len(times) < steps or (time.perf_counter() < end and len(times) < MAX_STEPS):
            t0 = clock()
            rec = trainer.train_step()
            times.append(clock() - t0)
            tokens.append(rec["tokens"])
        peak_rss = peak_rss_bytes()
        peaks = measure(trainer.device, clock=clock)
    return {
        "step_s": times,
        "tokens": tokens,
        "peak_rss": peak_rss,
        "peaks": peaks.__dict__,
    }


def child_baseline(case: list[str]) -> dict[str, Any]:
    """In a fresh process: everything train does before the model (data + tokenisation)."""
    _quiet()
    import bitblend.train.trainer  # noqa: F401  (the same imports as a training run)
    from bitblend.config.load import load_recipe
    from bitblend.estimate import backbone_config
    from bitblend.taskspec import encode_task, head_spec, load_data

    backbone, precision, batch, seq = case[0], case[1], int(case[2]), int(case[3])
    recipe = load_recipe("bbc", overrides(backbone, precision, batch, seq, 1))
    datas = load_data(recipe)
    _, tokenizer = backbone_config(backbone, None)
    for i, (task, data) in enumerate(zip(recipe.tasks, datas, strict=True)):
        spec = head_spec(task, data, tokenizer, False, i)
        encode_task(task, spec, data.train, data.train_targets, tokenizer, recipe)
        encode_task(task, spec, data.eval, data.eval_targets, tokenizer, recipe)
    return {"peak_rss": peak_rss_bytes()}


def _write_csv(path: Path, header: list[str], rows: list[tuple[str, str]]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def user_recipe(name: str, root: Path) -> dict[str, Any]:
    """The recipe (as a dict) of user case `name`, its data files written under `root`."""
    from bitblend.data.builtin import load_builtin

    backbone, steps, eval_every = USER_CASES[name]
    bbc = load_builtin("bbc_news").train
    rows = list(zip(bbc.text or [], map(str, bbc.labels), strict=True))
    # A large eval file: 400 articles to train on, 900 others evaluated every time.
    train_csv = _write_csv(root / "bbc_train.csv", ["text", "label"], rows[::5][:400])
    eval_csv = _write_csv(
        root / "bbc_eval.csv", ["text", "label"], [r for i, r in enumerate(rows) if i % 5][:900]
    )
    zh = load_builtin("chinese_reviews").train
    zh_rows = list(zip(zh.text or [], map(str, zh.labels), strict=True))[::4]
    zh_csv = _write_csv(root / "reviews.csv", ["评论", "情感"], zh_rows)
    bbc_task = {"name": "bbc", "data": str(train_csv), "eval_data": str(eval_csv)}
    zh_task = {"name": "reviews", "data": str(zh_csv), "text_column": "评论",
               "label_column": "情感", "tokenizer": "wordpiece"}  # fmt: skip
    tasks = {
        "large-eval-file": [bbc_task],
        "own-vocab-chinese": [zh_task],
        "four-task-mixture": [
            bbc_task,
            zh_task,
            {"name": "reuters", "data": "reuters_r8"},
            {"name": "tweets", "data": "election_tweets"},
        ],
    }[name]
    return {
        "name": name,
        "model": {"backbone": backbone, "max_length": 128},
        "tasks": tasks,
        "precision": {"recipe": "auto"},
        "mixing": {"strategy": "temperature"},
        "train": {"steps": steps, "batch_size": 16, "eval_every": eval_every},
    }


def child_user(name: str, what: str) -> dict[str, Any]:
    """In a fresh process: `estimate` (what) or the whole `train` of user case `name`."""
    _quiet()
    with tempfile.TemporaryDirectory() as tmp:
        from bitblend.config.load import recipe_from_dict

        recipe = recipe_from_dict(user_recipe(name, Path(tmp)))
        if what == "estimate":
            from bitblend.estimate import estimate_recipe
            from bitblend.estimate.report import to_json

            # the runtime measured as the CLI does (a child importing, loading, tokenising)
            est = estimate_recipe(recipe, precision="recipe", runtime="measure")
            out = to_json(est)
            row = out["rows"][0]
            return {
                # the mean padded length each task's steps are priced at (of max_length)
                "priced_positions": {
                    t["name"]: t["priced"]["mean_train_positions"] for t in out["tasks"]
                },
                "probe": {
                    **est.peaks.conditions(),
                    "speed_now": est.peaks.speed,  # probe.speed_now: what times are priced at
                    "memory_speed_now": est.peaks.memory_speed,
                },
                "load_avg": os.getloadavg()[0],
                "process_peak": row["memory"]["process_peak"],
                "run": row["run"],
                "eval_time_s": row["eval_time_s"],
                "step_s": row["mean_time_per_step_s"],
                "runtime_bytes": est.runtime_bytes,
                "tensor_peak": row["memory"]["peak"],
                "kernel_cache": row["memory"]["kernel_cache"],
                "end_of_run": row["memory"]["end_of_run"],
            }
        from bitblend.train.trainer import Trainer

        imports_rss = _maxrss()
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        trainer = Trainer(recipe, Path(tmp) / "run", show_progress=False)
        setup_rss, setup_s = _maxrss(), time.perf_counter() - t0
        eval_s: list[float] = []
        evaluate = trainer.evaluate

        def timed_evaluate() -> Any:  # each evaluation's wall time, for the eval model
            e0 = time.perf_counter()
            out = evaluate()
            eval_s.append(time.perf_counter() - e0)
            return out

        trainer.evaluate = timed_evaluate  # type: ignore[method-assign]
        summary = trainer.fit()
        wall = time.perf_counter() - t0
    return {
        "load_avg": load0,  # 1-minute load average before and after the run
        "load_avg_end": os.getloadavg()[0],
        "probe": summary.get("probe"),  # the probe the run's MFU used
        "peak_rss": _maxrss(),
        "imports_rss": imports_rss,  # python, torch, transformers, bitblend
        "setup_rss": setup_rss,  # + data, tokenisation, model, optimizer (no step yet)
        "setup_s": setup_s,
        "eval_s": eval_s,
        "wall_s": wall,
        "train_time_s": summary["train_time_s"],
        "steps": summary["steps"],
        "summary_wall_s": summary["wall_time_s"],
    }


def child_phases(target: str, sets: list[str]) -> None:
    """One whole run with a sampler thread: peak RSS and glibc's live bytes (mallinfo2:
    in-use heap + mmapped blocks) per phase. Samples every 2 ms, so a short spike can be
    missed (ru_maxrss at the end is the exact overall peak)."""
    import threading

    from bitblend.procmem import malloc_live_bytes

    page = os.sysconf("SC_PAGE_SIZE")
    phase, peaks = ["imports"], {}

    def sample() -> None:
        while True:
            rss = int(Path("/proc/self/statm").read_text().split()[1]) * page
            live = malloc_live_bytes() or 0
            old = peaks.get(phase[0], (0, 0))
            peaks[phase[0]] = (max(old[0], rss), max(old[1], live))
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    _quiet()
    import bitblend.models.adapters as adapters
    import bitblend.report.html as html
    import bitblend.train.dcp as dcp
    import bitblend.train.distributed as distributed
    import bitblend.train.setup as setup
    import bitblend.train.trainer as trainer
    from bitblend.config.load import load_recipe, recipe_from_dict

    def wrap(owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def timed(*a: Any, **k: Any) -> Any:
            before, phase[0] = phase[0], label
            try:
                return fn(*a, **k)
            finally:
                phase[0] = before

        setattr(owner, name, timed)

    for owner, name in [(trainer, "load_data"), (trainer, "build_model"),
                        (setup, "load_backbone_with_head"), (adapters, "add_lora"),
                        (trainer, "build_tasks"), (trainer, "convert_model"),
                        (trainer.Trainer, "evaluate"), (trainer.Trainer, "save_checkpoint"),
                        (trainer, "run_baselines"), (trainer, "save_model"),
                        (html, "write_report"), (distributed.DistContext, "wrap"),
                        (dcp, "save_sharded"), (dcp, "gather_replica")]:  # fmt: skip
        wrap(owner, name, name)
    step = trainer.Trainer.train_step

    def train_step(self: Any) -> Any:
        phase[0] = "train_step"
        try:
            return step(self)
        finally:
            phase[0] = "between"

    trainer.Trainer.train_step = train_step  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        if target.startswith("user:"):
            from bitblend.config.load import apply_overrides

            data = apply_overrides(user_recipe(target[5:], Path(tmp)), sets)
            recipe = recipe_from_dict(data)
        else:
            recipe = load_recipe(target, sets)
        phase[0] = "setup (other)"
        run = Path(tmp) / "run"
        if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun: every rank writes one run dir
            run = Path(tempfile.gettempdir()) / f"phases-{os.environ['TORCHELASTIC_RUN_ID']}"
        summary = trainer.Trainer(recipe, run, show_progress=False).fit()
    time.sleep(0.01)
    # under torchrun every rank prints its own phases, prefixed with its rank
    rank = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ else ""
    for name, (rss, live) in peaks.items():
        mib = f"peak RSS {rss / 2**20:7.0f} MiB, malloc live {live / 2**20:7.0f} MiB"
        print(f"{rank}{name:24} {mib}")
    print(f"{rank}ru_maxrss {_maxrss() / 2**20:.0f} MiB, summary.json peak "
          f"{summary.get('peak_memory_bytes', 0) / 2**20:.0f} MiB")  # fmt: skip


def _maxrss() -> int:
    """This process's peak RSS so far, bytes (Linux reports KiB)."""
    return peak_rss_bytes()  # not ru_maxrss: a spawned child's reads its parent's


def main_user(json_out: str | None, measured: str | None = None) -> None:
    """Run the users' recipes: estimate and train each in its own process; print a table.
    `measured`: a --json file of an earlier --user run whose training runs are reused (the
    estimates are made again)."""
    rows = []
    runs = (
        {r["case"]: r["run"] for r in json.loads(Path(measured).read_text())["user"]}
        if (measured)
        else {}
    )
    for name in USER_CASES:
        if runs and name not in runs:
            continue  # --measured: only the cases that file measured
        run = runs.get(name) or run_child(["--user-child", name, "train"])
        est = run_child(["--user-child", name, "estimate"])
        row = {
            "case": name,
            "measured_rss": run["peak_rss"],
            "estimated_rss": est["process_peak"],
            "memory_error": est["process_peak"] / run["peak_rss"] - 1,
            # what the estimate's run time covers: the train steps plus every evaluation
            # (fit()'s whole wall time, with checkpoints, baselines and the report, beside it)
            "measured_run_s": run["train_time_s"] + sum(run.get("eval_s") or []),
            "measured_wall_s": run["summary_wall_s"],
            "estimated_run_s": est["run"]["time_s"],
            "time_error": est["run"]["time_s"]
            / (run["train_time_s"] + sum(run.get("eval_s") or []))
            - 1,
            "measured_train_s": run["train_time_s"],
            # the steps and the warm-up's page faults (a short run's train time is mostly
            # the first steps' faults: a steady step beside it would compare unlike things)
            "estimated_train_s": est["run"]["steps"] * est["step_s"] + est["run"]["warmup_s"],
            "estimated_evals": est["run"]["evals"],
            "estimated_eval_s": est["eval_time_s"],
            "measured_eval_s": run.get("eval_s"),
            # per optimizer step: the run's train time over its steps, the estimate's mean
            "measured_step_s": run["train_time_s"] / max(1, run["steps"]),
            "estimated_step_s": est["step_s"],
            "step_time_error": est["step_s"] / (run["train_time_s"] / max(1, run["steps"])) - 1,
            "load_avg": [run.get("load_avg"), run.get("load_avg_end"), est.get("load_avg")],
            "run": run,
            "estimate": est,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| case | measured RSS MiB | estimate MiB | memory error (target 10%) | measured "
          "train s | estimate train s (steps + warm-up) | train error | measured run s (train "
          "+ evals) | estimate run s | run error (target 25%) | load avg (run start, end; "
          "estimate) | probe (speed now: matmul, memory) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        probe = r["estimate"].get("probe") or {}
        loads = ", ".join("-" if v is None else f"{v:.1f}" for v in r["load_avg"])
        train_error = r["estimated_train_s"] / r["measured_train_s"] - 1
        print(
            f"| {r['case']} | {r['measured_rss'] / 2**20:.0f} | {r['estimated_rss'] / 2**20:.0f} "
            f"| {r['memory_error']:+.1%} | {r['measured_train_s']:.1f} | "
            f"{r['estimated_train_s']:.1f} | {train_error:+.1%} | "
            f"{r['measured_run_s']:.1f} | {r['estimated_run_s']:.1f} | {r['time_error']:+.1%} "
            f"| {loads} | {probe.get('source', '?')}, {probe.get('measured_at', '?')}, load "
            f"{probe.get('load_avg_at_probe', '?')} ({probe.get('speed_now', 1):.2f}, "
            f"{probe.get('memory_speed_now', 1):.2f}) |"
        )
    if json_out:
        Path(json_out).write_text(json.dumps({"user": rows}, indent=2))


def run_child(args: list[str]) -> dict[str, Any]:
    """Run this file as a child with `args`; its last stdout line is JSON."""
    cmd = [sys.executable, __file__, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def estimate_case(
    case: tuple[str, str, int, int], peaks: dict[str, Any], base: int, threads: int
) -> Any:
    """The estimate of one case with the child's own probe and baseline."""
    from bitblend.config.load import load_recipe
    from bitblend.estimate import estimate_recipe
    from bitblend.estimate.probe import Peaks

    recipe = load_recipe("bbc", overrides(*case, 10, threads))
    est = estimate_recipe(recipe, precision="recipe", peaks=Peaks(**peaks))
    est.runtime_bytes = base
    return est


def accelerate_estimate() -> dict[str, Any]:
    """What `accelerate estimate-memory` reports for MiniLM ("Training using Adam").

    Its CLI looks the model up on the Hugging Face Hub first, which fails offline, so this
    builds the same empty model (AutoModel from MiniLM's config.json, on the meta device)
    and calls accelerate's own functions when accelerate is importable, or applies their
    method otherwise: model bytes in fp32, training = the largest of model, gradients,
    Adam states (2x) and step (4x) for float32, 2x for bf16 mixed precision; batch 1,
    no activations.
    """
    import torch
    from transformers import AutoConfig, AutoModel

    from bitblend.models.backbones import minilm_path

    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(minilm_path()))
    try:
        import accelerate
        from accelerate.commands.estimate import estimate_training_usage
        from accelerate.utils import calculate_maximum_sizes

        total, _ = calculate_maximum_sizes(model)
        fp32 = max(estimate_training_usage(total, "float32").values())
        bf16 = max(estimate_training_usage(total, "bfloat16").values())
        source = f"accelerate {accelerate.__version__}'s own functions"
    except ImportError:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        fp32, bf16 = 4 * total, 2 * total
        source = "its method (accelerate is not installed)"
    return {"source": source, "model_bytes": int(total), "fp32": int(fp32), "bf16": int(bf16)}


def ours_batch1(precision: str) -> int:
    """Our tensor peak for MiniLM on BBC News at batch 1, seq 128 (Accelerate's batch)."""
    from bitblend.config.load import load_recipe
    from bitblend.estimate import estimate_recipe

    recipe = load_recipe("bbc", overrides("minilm", precision, 1, 128, 10))
    return int(estimate_recipe(recipe, precision="recipe").rows[0].memory.peak)


def main() -> None:
    """Alternate the cases over rounds; print and optionally save the comparison table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: all cores)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="cpu",
        help="cpu: time steps and probe in process CPU seconds (needs --threads 1), which a "
        "busy machine cannot inflate",
    )
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--baseline", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--user", action="store_true", help="users' recipes: whole runs on files")
    p.add_argument("--measured", help="--user: reuse the training runs of this --json file")
    p.add_argument("--user-child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--phases", help="a recipe (or user:CASE): RSS per phase of one run")
    p.add_argument("--set", action="append", default=[], help="--phases: recipe overrides")
    args = p.parse_args()
    if args.phases:
        child_phases(args.phases, args.set)
        return
    if args.user_child:
        print(json.dumps(child_user(*args.user_child)))
        return
    if args.user:
        main_user(args.json, args.measured)
        return
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu needs --threads 1 (CPU seconds of several threads add up)")
    if args.child:
        res = child_case(args.child, args.steps, args.warmup, args.threads, args.clock)
        print(json.dumps(res))
        return
    if args.baseline:
        print(json.dumps(child_baseline(args.baseline)))
        return

    _quiet()
    t_start = time.perf_counter()
    bases: dict[tuple[str, int], list[int]] = {}
    runs: dict[tuple[str, str, int, int], list[dict[str, Any]]] = {c: [] for c in CASES}
    for rnd in range(args.rounds):
        for key in sorted({(c[0], c[3]) for c in CASES}):
            res = run_child(["--baseline", key[0], "32-true", "8", str(key[1])])
            bases.setdefault(key, []).append(res["peak_rss"])
        for case in CASES:
            flags = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            flags += ["--threads", str(args.threads), "--clock", args.clock]
            res = run_child(["--child", *map(str, case), *flags])
            runs[case].append(res)
            print(
                f"round {rnd + 1} {case}: {min(res['step_s']):.3f} s/step, "
                f"peak RSS {res['peak_rss'] / 2**20:.0f} MiB",
                flush=True,
            )
    rows = []
    for case, results in runs.items():
        base = int(statistics.median(bases[(case[0], case[3])]))
        step = statistics.median(min(r["step_s"]) for r in results)
        rss = int(statistics.median(r["peak_rss"] for r in results))
        # The estimate with the probe of the round whose step time is the median's.
        mid = sorted(results, key=lambda r: min(r["step_s"]))[len(results) // 2]
        est = estimate_case(case, mid["peaks"], base, args.threads)
        row = est.rows[0]
        est_mem = est.total_bytes(row)
        rows.append(
            {
                "backbone": case[0],
                "precision": case[1],
                "batch": case[2],
                "seq": case[3],
                "tokens_per_step": statistics.median(
                    statistics.median(r["tokens"]) for r in results
                ),
                "baseline_bytes": base,
                "measured_rss": rss,
                "estimated_rss": est_mem,
                "estimated_tensor_peak": row.memory.peak,
                "memory_error": est_mem / rss - 1,
                "model_part_error": (est_mem - base) / (rss - base) - 1,
                "measured_step_s": step,
                "estimated_step_s": row.time.total,
                "time_error": row.time.total / step - 1,
                "time_parts_s": row.time.parts,
                "probe": mid["peaks"],
            }
        )
    acc = accelerate_estimate()
    acc["ours_batch1"] = {p: ours_batch1(p) for p in ("32-true", "bf16-mixed")}
    print_table(rows, acc, args, time.perf_counter() - t_start)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "accelerate": acc}, indent=2))


def print_table(rows: list[dict[str, Any]], acc: dict[str, Any], args: Any, secs: float) -> None:
    """A Markdown table (for docs/estimate.md) and the Accelerate comparison."""
    mib = 2**20
    threads = args.threads or "all"
    print(
        f"\nmedian of {args.rounds} rounds, best of >= {args.steps} timed steps "
        f"(>= {MIN_SECONDS:.0f} s) each, "
        f"threads {threads}, {args.clock} clock ({secs:.0f} s)\n"
    )
    print(
        "| backbone | precision | batch x seq | baseline MiB | measured RSS MiB | "
        "estimate MiB | memory error | above-baseline error | measured s/step | "
        "estimate s/step | time error |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['backbone']} | {r['precision']} | {r['batch']} x {r['seq']} | "
            f"{r['baseline_bytes'] / mib:.0f} | {r['measured_rss'] / mib:.0f} | "
            f"{r['estimated_rss'] / mib:.0f} | {r['memory_error']:+.1%} | "
            f"{r['model_part_error']:+.1%} | {r['measured_step_s']:.3f} | "
            f"{r['estimated_step_s']:.3f} | {r['time_error']:+.1%} |"
        )
    ours = acc["ours_batch1"]
    print(
        f"\nAccelerate estimate-memory on MiniLM ({acc['source']}; batch 1, no activations): "
        f"model {acc['model_bytes'] / mib:.0f} MiB, training with Adam "
        f"{acc['fp32'] / mib:.0f} MiB fp32, {acc['bf16'] / mib:.0f} MiB bf16. bitblend, batch 1 "
        f"x 128: {ours['32-true'] / mib:.0f} MiB 32-true, {ours['bf16-mixed'] / mib:.0f} MiB "
        "bf16-mixed (live tensors); for the measured cases see the table."
    )


if __name__ == "__main__":
    main()
