"""Model-level mixing on BBC News: soups vs the best member, ensembles vs the best member on
NLL and ECE, and a distilled student against its ensemble teacher on accuracy and cost.

BBC News is split once (seeded) into train / val / test CSVs. Members all train on train
and never see val or test: three MiniLM-L6 fine-tunes (seed 0 bf16-mixed, seed 0 32-true,
seed 1 bf16-mixed), a tiny-bert and tfidf-logreg. "Best member" is the one with the highest
val accuracy. Ensembles, soups, temperatures and scales are fitted on val; every reported
figure is on test. Every ensemble is fitted twice: on the members' raw probabilities and
with each member temperature-scaled first (--calibrate-members). The student is MiniLM cut
to its first 3 layers (bf16-mixed), distilled from the saved `stack` ensemble (raw members);
the same student trained on hard labels alone is the baseline. Inference cost: measured
seconds to predict the test split (ensemble = the sum over its members, run one after
another) and matmul FLOPs per example.

    .venv/bin/python benchmarks/model_mixing.py [--steps 60] [--threads 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("mean", "vote", "weighted", "product", "stack")
MINILMS = {
    "minilm-s0-bf16": ["precision.recipe=bf16-mixed", "train.seed=0"],
    "minilm-s0-fp32": ["precision.recipe=32-true", "train.seed=0"],
    "minilm-s1-bf16": ["precision.recipe=bf16-mixed", "train.seed=1"],
}


def cli(*argv: str) -> None:
    """Run a bitblend command in this process; fail loudly."""
    from bitblend.cli import main

    code = main(list(argv))
    assert code == 0, argv


def sets(items: list[str]) -> list[str]:
    """--set a --set b ..."""
    return [x for s in items for x in ("--set", s)]


def write_splits(work: Path, seed: int = 2024) -> dict[str, Path]:
    """train (1400) / val (400) / test (425) CSVs of BBC News."""
    import pandas as pd

    from bitblend.data.builtin import load_builtin

    bbc = load_builtin("bbc_news").train
    assert bbc.text is not None
    order = np.random.default_rng(seed).permutation(len(bbc))
    frame = pd.DataFrame(
        {"text": [bbc.text[i] for i in order], "label": [bbc.labels[i] for i in order]}
    )
    parts = {"train": frame[:1400], "val": frame[1400:1800], "test": frame[1800:]}
    out = {}
    for name, part in parts.items():
        out[name] = work / f"{name}.csv"
        part.to_csv(out[name], index=False)
    return out


def minilm_layers(work: Path, layers: int) -> Path:
    """The pretrained MiniLM-L6 cut to its first `layers` layers (a smaller student)."""
    from transformers import AutoModel, AutoTokenizer

    from bitblend.models.backbones import minilm_path

    out = work / f"minilm-{layers}l"
    if not (out / "config.json").is_file():
        model = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
        model.encoder.layer = model.encoder.layer[:layers]
        model.config.num_hidden_layers = layers
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(out)
    return out


def test_metrics(run: Any, table: Any, y: np.ndarray) -> tuple[dict[str, float], float]:
    """Calibration metrics of a run on the test table and the seconds its prediction took."""
    from bitblend.tasks import calibration as cal

    task = run.tasks[0].name
    run.outputs(task, table.take(np.arange(16)))  # warm-up: first-call allocations
    t0 = time.perf_counter()
    out = run.outputs(task, table)
    seconds = time.perf_counter() - t0
    return cal.metrics(cal.to_probs(run.head(task), out), y), seconds


def forward_flops(run_dir: Path, texts: list[str]) -> float:
    """Matmul FLOPs per example of a transformer run on these texts (0 for tfidf-logreg)."""
    from transformers import AutoTokenizer

    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file():
        return 0.0  # TF-IDF: a sparse dot product, ~2 * nnz * classes, negligible here
    cfg = json.loads((model_dir / "config.json").read_text())
    import yaml

    max_length = yaml.safe_load((run_dir / "recipe.yaml").read_text())["model"]["max_length"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs = np.array(
        [len(x) for x in tok(texts, truncation=True, max_length=max_length)["input_ids"]]
    )
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    per_token = layers * (4 * 2 * h * h + 2 * 2 * h * i)  # q, k, v, out projections + MLP
    attention = layers * 2 * 2 * seqs.astype(np.float64) ** 2 * h  # q @ k^T and probs @ v
    return float(np.mean(per_token * seqs + attention))


def train_members(work: Path, data: dict[str, Path], args: argparse.Namespace) -> dict[str, Path]:
    """The five members, each trained on train with val as its eval split (kept if present)."""
    wall0 = time.perf_counter()
    common = common_sets(data, args)
    runs: dict[str, Path] = {}
    for name, extra in MINILMS.items():
        runs[name] = work / name
        if not runs[name].exists():
            cli(
                "train",
                "bbc",
                "--out",
                str(runs[name]),
                "--quiet",
                *sets([*common, f"train.steps={args.steps}", *extra]),
            )
        print(f"trained {name} ({time.perf_counter() - wall0:.0f}s)", flush=True)
    runs["tiny-bert"] = work / "tiny-bert"
    if not runs["tiny-bert"].exists():
        cli(
            "train",
            "tiny",
            "--out",
            str(runs["tiny-bert"]),
            "--quiet",
            *sets([*common, "model.max_length=128", "train.steps=200", "train.batch_size=32"]),
        )
    runs["tfidf-logreg"] = work / "tfidf-logreg"
    if not runs["tfidf-logreg"].exists():
        cli(
            "train",
            "tiny",
            "--out",
            str(runs["tfidf-logreg"]),
            "--quiet",
            *sets([*common, "model.backbone=tfidf-logreg"]),
        )
    print(f"members trained ({time.perf_counter() - wall0:.0f}s)", flush=True)
    return runs


def common_sets(data: dict[str, Path], args: argparse.Namespace) -> list[str]:
    """Recipe overrides every run shares: the split's files, no mid-run evaluation."""
    common = [
        f"tasks.0.data={data['train']}",
        f"tasks.0.eval_data={data['val']}",
        "train.eval_every=0",
        "train.eval_max_examples=null",
        "tasks.0.max_examples=null",
    ]
    if args.threads:
        common.append(f"train.threads={args.threads}")
    return common


def fit_ensembles(runs: dict[str, Path], data: dict[str, Path]) -> dict[str, Any]:
    """Every ensemble method, on raw and on temperature-scaled members, fitted on val and
    measured on test; the best member by val accuracy."""
    from bitblend.ensemble.spec import fit_ensemble
    from bitblend.runs.base import read_labelled
    from bitblend.runs.load import load_run
    from bitblend.runs.spec import member_matrix, resolve_members

    names = list(runs)
    members, head, labels = resolve_members([runs[n] for n in names], None, load_run)
    task = members[0].run.task(None)[1]
    t_val, y_val = read_labelled(data["val"], 0, task, head, labels)
    t_test, y_test = read_labelled(data["test"], 0, task, head, labels)
    val, test = member_matrix(members, head, t_val), member_matrix(members, head, t_test)
    val_acc = {n: float((val[k].argmax(1) == y_val).mean()) for k, n in enumerate(names)}
    fits = {m: fit_ensemble(m, val, y_val, test, y_test) for m in METHODS}
    for m in METHODS:
        fits[f"{m}+cal"] = fit_ensemble(m, val, y_val, test, y_test, 0, True)
    reports = {m: r for m, (_, r) in fits.items()}
    return {
        "names": names,
        "fits": fits,
        "reports": reports,
        "val_acc": val_acc,
        "best": max(names, key=lambda n: val_acc[n]),
        "members_test": {n: reports["mean"]["members"][k] for k, n in enumerate(names)},
        "t_test": t_test,
        "y_test": y_test,
    }


def main() -> None:
    """Train the members, combine them every way, distil, print and save the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="MiniLM fine-tuning steps")
    p.add_argument("--student-steps", type=int, default=80)
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy box)")
    p.add_argument("--work", help="keep runs here (default: a temporary directory)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument(
        "--split-seeds",
        help="comma-separated split seeds: members and ensembles only, once per split "
        "(in WORK/split-SEED), then the mean over splits of every test metric",
    )
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None if args.work else tempfile.TemporaryDirectory()
    work = Path(args.work or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    if args.split_seeds:
        over_splits(work, [int(x) for x in args.split_seeds.split(",")], args)
        if tmp is not None:
            tmp.cleanup()
        return
    wall0 = time.perf_counter()
    data = write_splits(work)
    common = common_sets(data, args)
    runs = train_members(work, data, args)

    from bitblend.runs.load import load_run

    fitted = fit_ensembles(runs, data)
    names, fits, reports = fitted["names"], fitted["fits"], fitted["reports"]
    val_acc, best, member_test = fitted["val_acc"], fitted["best"], fitted["members_test"]
    t_test, y_test = fitted["t_test"], fitted["y_test"]
    print(f"ensembles fitted ({time.perf_counter() - wall0:.0f}s)", flush=True)

    # Merges of the three MiniLM fine-tunes (the only runs sharing one backbone): soups, and
    # task vectors against the pretrained MiniLM with their scale searched on val.
    soups: dict[str, dict[str, float]] = {}
    minilm = [str(runs[n]) for n in MINILMS]
    for method in ("uniform", "greedy-soup", "task-arithmetic", "ties"):
        out = work / f"soup-{method}"
        if not out.exists():
            cli("merge", *minilm, "--method", method, "--data", str(data["val"]), "--out", str(out))
        soups[method] = test_metrics(load_run(out), t_test, y_test)[0]
    kept = json.loads((work / "soup-greedy-soup" / "summary.json").read_text())["merge"]["kept"]
    best_minilm = max(MINILMS, key=lambda n: val_acc[n])
    print(f"soups merged ({time.perf_counter() - wall0:.0f}s)", flush=True)

    # The teacher: the stacked ensemble of all five, saved as a spec.
    spec = work / "ensemble-stack"
    if not spec.exists():
        cli(
            "ensemble",
            *(str(runs[n]) for n in names),
            "--method",
            "stack",
            "--val-data",
            str(data["val"]),
            "--data",
            str(data["test"]),
            "--out",
            str(spec),
        )
    student_dir = minilm_layers(work, 3)
    student = [
        *common,
        f"model.backbone={student_dir}",
        "precision.recipe=bf16-mixed",
        f"train.steps={args.student_steps}",
    ]
    students: dict[str, Path] = {"distilled": work / "student-kd", "hard-labels": work / "student"}
    if not students["distilled"].exists():
        cli(
            "distill",
            "--teacher",
            str(spec),
            "--student",
            "bbc",
            "--quiet",
            *sets(student),
            "--temperature",
            "2",
            "--alpha",
            "0.7",
            "--out",
            str(students["distilled"]),
        )
    if not students["hard-labels"].exists():
        cli("train", "bbc", "--quiet", *sets(student), "--out", str(students["hard-labels"]))
    print(f"students trained ({time.perf_counter() - wall0:.0f}s)", flush=True)

    # Inference cost, measured in one process, one run after another.
    latency: dict[str, float] = {}
    for n in names:
        latency[n] = test_metrics(load_run(runs[n]), t_test, y_test)[1]
    student_test = {}
    for k, path in students.items():
        student_test[k], latency[f"student-{k}"] = test_metrics(load_run(path), t_test, y_test)
    texts = [str(t) for t in (t_test.text or [])]
    flops = {n: forward_flops(runs[n], texts) for n in names}
    flops["student"] = forward_flops(students["distilled"], texts)
    ens_latency, ens_flops = sum(latency[n] for n in names), sum(flops[n] for n in names)
    teacher = reports["stack"]["ensemble"]["after"]
    distill_info = json.loads((students["distilled"] / "distill.json").read_text())

    figures = {
        "best_member": best,
        "val_accuracy": val_acc,
        "members_test": member_test,
        "ensembles_test": {m: r["ensemble"] for m, r in reports.items()},
        "weighted_weights": dict(zip(names, fits["weighted"][0].weights.tolist(), strict=True)),
        "product_weights": dict(zip(names, fits["product"][0].weights.tolist(), strict=True)),
        "weighted_cal_weights": dict(
            zip(names, fits["weighted+cal"][0].weights.tolist(), strict=True)
        ),
        "soups_test": soups,
        "greedy_kept": kept,
        "best_minilm": best_minilm,
        "students_test": student_test,
        "distill": distill_info["per_task"],
        "latency_s": latency,
        "flops_per_example": flops,
        "student_vs_ensemble": {
            "accuracy_ratio": student_test["distilled"]["accuracy"] / teacher["accuracy"],
            "latency_ratio": latency["student-distilled"] / ens_latency,
            "flops_ratio": flops["student"] / ens_flops,
        },
        "threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - wall0,
    }
    report(figures, names)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()


def over_splits(work: Path, seeds: list[int], args: argparse.Namespace) -> None:
    """Members and ensembles on several seeded splits; the mean of each test metric, and
    per split whether each ensemble beats that split's best member (by val accuracy) on
    NLL and ECE, raw and after temperature scaling. One 425-article test split resolves
    ECE only to about +-0.005 (a handful of confident errors), less than the gaps here."""
    keys = ("accuracy", "nll", "ece", "brier")
    rows: dict[str, dict[str, list[float]]] = {}
    wins: dict[str, list[tuple[bool, bool]]] = {}
    for seed in seeds:
        split = work / f"split-{seed}"
        split.mkdir(parents=True, exist_ok=True)
        data = write_splits(split, seed)
        fitted = fit_ensembles(train_members(split, data, args), data)
        best = fitted["members_test"][fitted["best"]]
        everyone = {f"member {n}": r for n, r in fitted["members_test"].items()}
        everyone.update({f"ensemble {m}": r["ensemble"] for m, r in fitted["reports"].items()})
        for name, r in everyone.items():
            for when in ("before", "after"):
                for k in keys:
                    rows.setdefault(name, {}).setdefault(f"{k}/{when}", []).append(r[when][k])
            if name.startswith("ensemble"):
                wins.setdefault(name, []).append(
                    tuple(
                        r[w]["nll"] < best[w]["nll"] and r[w]["ece"] < best[w]["ece"]
                        for w in ("before", "after")
                    )
                )
        print(f"split {seed}: best member {fitted['best']}", flush=True)
    print(
        f"\nmean over {len(seeds)} splits (test, 425 articles each); 'beats' = NLL and ECE "
        "both below the split's best member, raw / after temperature scaling"
    )
    print("| model | acc | NLL | ECE | Brier | NLL@T | ECE@T | Brier@T | beats raw | beats @T |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    out: dict[str, Any] = {"seeds": seeds, "rows": rows, "wins": wins}
    for name, cols in rows.items():
        m = {c: float(np.mean(v)) for c, v in cols.items()}
        w = wins.get(name)
        raw = f"{sum(a for a, _ in w)}/{len(w)}" if w else "-"
        cal = f"{sum(b for _, b in w)}/{len(w)}" if w else "-"
        print(
            f"| {name} | {m['accuracy/before']:.4f} | {m['nll/before']:.4f} | "
            f"{m['ece/before']:.4f} | {m['brier/before']:.4f} | {m['nll/after']:.4f} | "
            f"{m['ece/after']:.4f} | {m['brier/after']:.4f} | {raw} | {cal} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


def report(f: dict[str, Any], names: list[str]) -> None:
    """Print the figures as Markdown tables."""
    print("\n| model | val acc | test acc | macro-F1 | NLL | ECE | Brier | NLL@T | ECE@T |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in names:
        r = f["members_test"][n]
        b, a = r["before"], r["after"]
        print(
            f"| {n} | {f['val_accuracy'][n]:.4f} | {b['accuracy']:.4f} | {b['macro_f1']:.4f} | "
            f"{b['nll']:.4f} | {b['ece']:.4f} | {b['brier']:.4f} | {a['nll']:.4f} | "
            f"{a['ece']:.4f} |"
        )
    for m, r in f["ensembles_test"].items():
        b, a = r["before"], r["after"]
        print(
            f"| ensemble {m} | - | {b['accuracy']:.4f} | {b['macro_f1']:.4f} | {b['nll']:.4f} | "
            f"{b['ece']:.4f} | {b['brier']:.4f} | {a['nll']:.4f} | {a['ece']:.4f} |"
        )
    print(f"\nbest member by val accuracy: {f['best_member']}")
    print("\n| merge of 3 MiniLMs | test acc | NLL | ECE |\n|---|---|---|---|")
    best = f["members_test"][f["best_minilm"]]["before"]
    print(
        f"| best MiniLM ({f['best_minilm']}) | {best['accuracy']:.4f} | {best['nll']:.4f} | "
        f"{best['ece']:.4f} |"
    )
    for m, r in f["soups_test"].items():
        print(f"| {m} | {r['accuracy']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} |")
    print(f"greedy soup kept: {', '.join(Path(k).name for k in f['greedy_kept'])}")
    print("\n| student (MiniLM 3 layers, bf16-mixed) | test acc | NLL | ECE |\n|---|---|---|---|")
    for k, r in f["students_test"].items():
        print(f"| {k} | {r['accuracy']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} |")
    s = f["student_vs_ensemble"]
    print(
        f"\nstudent / stack ensemble: accuracy {s['accuracy_ratio']:.4f}, measured latency "
        f"{s['latency_ratio']:.3f}, FLOPs {s['flops_ratio']:.3f}"
    )
    print(
        "latency (s, test split): " + ", ".join(f"{k} {v:.2f}" for k, v in f["latency_s"].items())
    )
    print(f"threads {f['threads']}, wall {f['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
