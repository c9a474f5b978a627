"""`bitblend merge`: one model from the weights of runs fine-tuned from the same backbone.

Methods (every tensor merged in fp32, then saved as a normal run directory):
- uniform: the mean of the weights (a uniform model soup, Wortsman et al. 2022).
- greedy-soup: ingredients sorted by held-out accuracy; each is added to the soup only if
  the soup's held-out accuracy rises (ties: if its held-out NLL falls).
- task-arithmetic: base + scale * sum_i (theta_i - base) (Ilharco et al. 2023).
- ties: trim each task vector to its top `density` share by magnitude (per tensor), elect
  each entry's sign by the summed trimmed vectors, average the entries that agree with it
  (Yadav et al. 2023): base + scale * merged.
- lora-merge: one LoRA run's adapter folded into its base, W + (alpha / r) * B @ A (peft
  merge_and_unload; lora_merge.py).
The base of task-arithmetic and TIES is the recipe's backbone before fine-tuning (the
pretrained weights, or a random-init alias rebuilt from its seed). Heads and adapters have
no base: a task's head is averaged over the runs that have that task, which requires the
same label space; a task only one run has keeps that run's head.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitblend.config.load import dump_recipe
from bitblend.config.schema import Recipe, TaskConfig
from bitblend.data.sources import load_task_data
from bitblend.data.table import Table
from bitblend.ensemble.lora_merge import run_lora_merge
from bitblend.errors import BitblendError
from bitblend.models.backbones import count_parameters, load_backbone, seed_everything
from bitblend.models.trunk import HeadSpec, MultiTaskModel, load_model
from bitblend.report.console import metrics_table
from bitblend.report.sinks import JsonlSink
from bitblend.runs.base import read_labelled
from bitblend.runs.evaluate import evaluate_run
from bitblend.runs.load import KIND_NAMES, run_kind, run_recipe
from bitblend.runs.transformer import TransformerRun, serve_model
from bitblend.tasks import calibration as cal
from bitblend.train.run_dir import check_new_run_dir, write_json

METHODS = ("uniform", "greedy-soup", "task-arithmetic", "ties")
RANDOM_INIT = ("tiny-bert", "tiny-gpt", "small-gpt")  # the base depends on train.seed
ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "n_embd",
    "n_layer",
    "n_head",
    "n_positions",
    "type_vocab_size",
)
State = dict[str, torch.Tensor]


# -- the arithmetic ------------------------------------------------------------------
def uniform(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The element-wise mean (fp32)."""
    return torch.stack([t.float() for t in tensors]).mean(dim=0)


def task_arithmetic(base: torch.Tensor, tensors: list[torch.Tensor], scale: float) -> torch.Tensor:
    """base + scale * sum of task vectors (theta_i - base)."""
    b = base.float()
    return b + scale * torch.stack([t.float() - b for t in tensors]).sum(dim=0)


def ties(
    base: torch.Tensor, tensors: list[torch.Tensor], scale: float, density: float
) -> torch.Tensor:
    """TIES-merging of one tensor: trim, elect sign, disjoint mean."""
    b = base.float()
    tau = torch.stack([t.float() - b for t in tensors])  # (runs, *shape)
    flat = tau.reshape(len(tensors), -1)
    k = max(1, round(density * flat.shape[1]))
    if k < flat.shape[1]:
        # Keep each task vector's k largest magnitudes; the rest is fine-tuning noise.
        cut = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values
        flat = torch.where(flat.abs() >= cut, flat, torch.zeros_like(flat))
    sign = torch.sign(flat.sum(dim=0))  # the elected sign of every entry
    agree = (torch.sign(flat) == sign) & (flat != 0)
    merged = (flat * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    return b + scale * merged.reshape(b.shape)


def merge_states(
    states: list[State],
    method: str,
    base: State | None = None,
    scale: float = 1.0,
    density: float = 0.2,
) -> State:
    """Merge full state dicts key by key (keys absent from a run are merged over the rest)."""
    out: State = {}
    keys = list(dict.fromkeys(k for s in states for k in s))
    for key in keys:
        vals = [s[key] for s in states if key in s]
        if not vals[0].is_floating_point():
            out[key] = vals[0].clone()  # integer buffers (position ids): identical by shape
        elif base is not None and key in base and method == "task-arithmetic":
            out[key] = task_arithmetic(base[key], vals, scale)
        elif base is not None and key in base and method == "ties":
            out[key] = ties(base[key], vals, scale, density)
        else:
            out[key] = uniform(vals)
    return out


# -- loading and checking -------------------------------------------------------------
@dataclass
class Ingredient:
    """One run to merge: its loaded (unconverted, fp32) model and recipe."""

    path: Path
    recipe: Recipe
    model: MultiTaskModel
    tokenizer: Any
    meta: dict[str, Any]
    state: State = field(default_factory=dict)


def load_ingredient(path: Path) -> Ingredient:
    """A transformer run's recipe and fp32 weights (one-line error for other kinds)."""
    kind = run_kind(path)  # checks the directory and the recipe
    if kind != "transformer":
        raise BitblendError(f"{path}: merge needs transformer runs; this is {KIND_NAMES[kind]}")
    recipe = run_recipe(path)
    model, tok, meta = load_model(path / "model")  # unconverted: what was saved
    if "adapter" in meta:  # model/ alone is the frozen base: merging it drops the adapter
        raise BitblendError(
            f"{path}: a LoRA adapter run; fold its adapter in first with "
            "`bitblend merge --method lora-merge`, then merge the result"
        )
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    return Ingredient(path, recipe, model, tok, meta, state)


def _arch(path: Path) -> dict[str, Any]:
    config = json.loads((path / "model" / "config.json").read_text())
    return {k: config[k] for k in ARCH_KEYS if k in config}


def check_compatible(items: list[Ingredient]) -> None:
    """Same architecture, parameter names and shapes, pooling; one label space per task."""
    first = items[0]
    arch0 = _arch(first.path)
    back0 = {k: v.shape for k, v in first.state.items() if k.startswith("backbone.")}
    specs0: dict[str, tuple[Path, HeadSpec]] = {}
    for it in items:
        arch = _arch(it.path)
        for key in ARCH_KEYS:  # model_type first: the most telling difference
            if arch0.get(key) != arch.get(key):
                raise BitblendError(
                    f"{it.path / 'model' / 'config.json'}: {key} {arch.get(key)} differs from "
                    f"{first.path}'s {arch0.get(key)}; merge needs runs of one architecture"
                )
        back = {k: v.shape for k, v in it.state.items() if k.startswith("backbone.")}
        diff = sorted(set(back) ^ set(back0))
        if diff:
            raise BitblendError(
                f"{it.path}/model: parameter {diff[0]} is in one run only "
                f"(vs {first.path}); merge needs one architecture"
            )
        for k, shape in back.items():
            if shape != back0[k]:
                raise BitblendError(
                    f"{it.path}/model: {k} has shape {tuple(shape)}, {first.path} {tuple(back0[k])}"
                )
        if it.model.pooling != first.model.pooling:
            raise BitblendError(
                f"{it.path}/model: pooling {it.model.pooling}, {first.path} {first.model.pooling}"
            )
        for name, spec in it.model.specs.items():
            if name not in specs0:
                specs0[name] = (it.path, spec)
                continue
            where, s0 = specs0[name]
            if spec.label_names != s0.label_names or spec.head != s0.head:
                raise BitblendError(
                    f"{it.path}/labels.json: task {name} ({spec.head}, labels "
                    f"{spec.label_names[:8]}) differs from {where}'s ({s0.head}, "
                    f"{s0.label_names[:8]}); heads merge only when label spaces match"
                )
            a = {k: v for k, v in dataclasses.asdict(spec).items() if not k.startswith("tabular_")}
            b = {k: v for k, v in dataclasses.asdict(s0).items() if not k.startswith("tabular_")}
            if a != b:
                raise BitblendError(
                    f"{it.path}/model/bitblend.json: task {name}'s inputs differ from {where}'s"
                )


def base_state(items: list[Ingredient]) -> State:
    """The backbone before fine-tuning (pretrained, or the alias rebuilt from its seed)."""
    first = items[0]
    name = first.recipe.model.backbone
    for it in items[1:]:
        if it.recipe.model.backbone != name:
            raise BitblendError(
                f"{it.path}/recipe.yaml: model.backbone {it.recipe.model.backbone}"
                f", {first.path} {name}; the base must be one backbone"
            )
        if name in RANDOM_INIT and it.recipe.train.seed != first.recipe.train.seed:
            raise BitblendError(
                f"{it.path}/recipe.yaml: train.seed {it.recipe.train.seed}, {first.path} "
                f"{first.recipe.train.seed}; {name} is random-init, so the runs have no common base"
            )
    seed_everything(first.recipe.train.seed)  # as build_model does before load_backbone
    backbone, _ = load_backbone(
        name, first.recipe.model.dropout, first.recipe.model.attention_dropout
    )
    base = {
        f"backbone.{k}": v.float()
        for k, v in backbone.state_dict().items()
        if v.is_floating_point()
    }
    for k, v in base.items():
        if k in first.state and first.state[k].shape != v.shape:
            raise BitblendError(
                f"{first.path}/model: {k} has shape {tuple(first.state[k].shape)}"
                f", the base {name} {tuple(v.shape)}"
            )
    return base


# -- the merged run -------------------------------------------------------------------
class Merger:
    """Builds merged models and scores them on held-out data of one task."""

    def __init__(self, items: list[Ingredient], out: Path, method: str) -> None:
        first = items[0]
        self.items = items
        specs: dict[str, HeadSpec] = {}
        tasks: dict[str, TaskConfig] = {}
        self.task_tokenizers: dict[str, Any] = {}
        for it in items:
            for name, spec in it.model.specs.items():
                specs.setdefault(name, spec)
                self.task_tokenizers.setdefault(name, it.meta["task_tokenizers"].get(name))
            for t in it.recipe.tasks:
                tasks.setdefault(t.name, t)
        self.task_tokenizers = {k: v for k, v in self.task_tokenizers.items() if v is not None}
        self.recipe = dataclasses.replace(
            first.recipe, tasks=list(tasks.values()), name=f"{first.recipe.name}-{method}"
        )
        self.template = MultiTaskModel(
            copy.deepcopy(first.model.backbone),
            list(specs.values()),
            first.model.pooling,
            first.model.head_dropout,
        )
        self.tokenizer = first.tokenizer
        self.out = out

    def materialise(self, state: State) -> TransformerRun:
        """A runnable model holding `state`, in the recipe's (serving) precision."""
        model = copy.deepcopy(self.template)
        model.load_state_dict(state, strict=True)
        precision, device = serve_model(model, self.recipe)
        return TransformerRun(
            self.out, self.recipe, model, self.tokenizer, self.task_tokenizers, precision, device
        )

    def score(self, state: State, task: str, table: Table, y: np.ndarray) -> dict[str, float]:
        """accuracy / macro-F1 / NLL / ECE / Brier of `state` on held-out data."""
        run = self.materialise(state)
        p = cal.to_probs(run.head(task), run.outputs(task, table))
        return cal.metrics(p, y.astype(np.int64))


def heldout(
    items: list[Ingredient], data: Path | None, task: str | None
) -> tuple[str, Table, np.ndarray]:
    """(task, table, targets) to rank ingredients and soups on."""
    common = [n for n in items[0].model.specs if all(n in it.model.specs for it in items)]
    pooled = [n for n in common if items[0].model.specs[n].head in ("classification", "binary")]
    if task is None:
        if len(pooled) != 1:
            raise BitblendError(f"--task: expected one of {', '.join(pooled) or '(none shared)'}")
        task = pooled[0]
    elif task not in pooled:
        raise BitblendError(
            f"--task {task}: expected a classification/binary task all runs "
            f"have ({', '.join(pooled) or 'none'})"
        )
    first = items[0]
    i, cfg = next((i, t) for i, t in enumerate(first.recipe.tasks) if t.name == task)
    spec = first.model.specs[task]
    if data is not None:
        table, y = read_labelled(data, i, cfg, spec.head, spec.label_names)
        return task, table, y
    # Without --data, the runs' own eval split serves only if it is one split for all of
    # them: a different seed or source would put one run's training data in it.
    key = (cfg.data, cfg.eval_data, cfg.eval_fraction, first.recipe.train.seed)
    for it in items[1:]:
        t = next(x for x in it.recipe.tasks if x.name == task)
        if (t.data, t.eval_data, t.eval_fraction, it.recipe.train.seed) != key:
            raise BitblendError(
                f"{it.path}: its eval split of {task} differs from "
                f"{first.path}'s (seed or data); give --data HELDOUT"
            )
    td = load_task_data(cfg, i, first.recipe.train.seed)
    return task, td.eval, td.eval_targets


@dataclass
class MergeOptions:
    """What `bitblend merge` was asked."""

    method: str
    data: Path | None = None
    task: str | None = None
    scale: float | None = None
    density: float = 0.2


def plan(
    items: list[Ingredient], merger: Merger, opt: MergeOptions, trace: list[dict[str, Any]]
) -> tuple[State, dict[str, Any]]:
    """The merged state and what was decided (kept ingredients, chosen scale)."""
    n = len(items)
    states = [it.state for it in items]
    info: dict[str, Any] = {}
    needs_data = opt.method == "greedy-soup" or (
        opt.scale is None and opt.method in ("task-arithmetic", "ties") and opt.data
    )
    if needs_data:
        task, table, y = heldout(items, opt.data, opt.task)
        y = np.asarray(y, dtype=np.int64)
        info["heldout_task"], info["heldout_examples"] = task, len(y)
    if opt.method == "uniform":
        return merge_states(states, "uniform"), info
    if opt.method == "greedy-soup":
        scores = [merger.score(s, task, table, y) for s in states]
        order = sorted(range(n), key=lambda i: (-scores[i]["accuracy"], scores[i]["nll"]))
        info["ingredients"] = [{"run": str(items[i].path), **scores[i]} for i in order]
        kept, best = [order[0]], scores[order[0]]
        trace.append({"candidate": str(items[order[0]].path), "kept": True, **best})
        for i in order[1:]:
            cand = merge_states([states[j] for j in [*kept, i]], "uniform")
            m = merger.score(cand, task, table, y)
            helps = m["accuracy"] > best["accuracy"] or (
                m["accuracy"] == best["accuracy"] and m["nll"] < best["nll"]
            )
            trace.append({"candidate": str(items[i].path), "kept": helps, **m})
            if helps:
                kept, best = [*kept, i], m
        info["kept"] = [str(items[i].path) for i in kept]
        info["soup"] = best
        return merge_states([states[j] for j in kept], "uniform"), info
    base = base_state(items)
    default = 1.0 / n if opt.method == "task-arithmetic" else 1.0
    grid = [opt.scale] if opt.scale is not None else [default]
    if needs_data:
        grid = sorted({round(default, 4), 0.3, 0.5, 0.7, 1.0})
    best_state, best_m, best_scale = None, None, grid[0]
    for s in grid:
        state = merge_states(states, opt.method, base, s, opt.density)
        if not needs_data:
            best_state = state
            break
        m = merger.score(state, task, table, y)
        trace.append({"scale": s, **m})
        if best_m is None or (m["accuracy"], -m["nll"]) > (best_m["accuracy"], -best_m["nll"]):
            best_state, best_m, best_scale = state, m, s
    info["scale"] = best_scale
    if opt.method == "ties":
        info["density"] = opt.density
    assert best_state is not None
    return best_state, info


def run_merge(
    run_dirs: list[Path], opt: MergeOptions, out: Path, console: Any = None
) -> dict[str, Any]:
    """`bitblend merge`: check, merge, evaluate and write a run directory; returns summary."""
    if opt.method == "lora-merge":  # one LoRA run folded into a full model (lora_merge.py)
        return run_lora_merge(run_dirs, out, opt.data, console)
    if opt.method not in METHODS:
        raise BitblendError(
            f"--method {opt.method}: expected one of {', '.join(METHODS)} or lora-merge"
        )
    if not 0.0 < opt.density <= 1.0:
        raise BitblendError(f"--density {opt.density}: expected a number in (0, 1]")
    check_new_run_dir(out)
    wall0 = time.perf_counter()
    items = [load_ingredient(p) for p in run_dirs]
    check_compatible(items)
    merger = Merger(items, out, opt.method)
    trace: list[dict[str, Any]] = []
    state, info = plan(items, merger, opt, trace)
    run = merger.materialise(state)
    if opt.data is not None:
        results = evaluate_run(run, opt.data, info.get("heldout_task", opt.task))
    else:
        results = evaluate_run(run, None, None)
    # Written only now: a failed merge leaves nothing behind.
    out.mkdir(parents=True, exist_ok=True)
    final = copy.deepcopy(merger.template)
    final.load_state_dict(state, strict=True)
    extra = {
        k: v
        for k, v in items[0].meta.items()
        if k not in ("format", "pooling", "head_dropout", "heads", "task_tokenizers")
    }
    final.save(
        out / "model",
        merger.tokenizer,
        merger.task_tokenizers,
        extra={**extra, "merge": {"method": opt.method, **info}},
    )
    (out / "recipe.yaml").write_text(dump_recipe(merger.recipe))
    labels = {n: s.label_names for n, s in final.specs.items() if s.label_names}
    write_json(out / "labels.json", labels)
    sink = JsonlSink(out / "metrics.jsonl")
    for k, rec in enumerate(trace, 1):
        sink.write({"step": k, "split": "merge", "method": opt.method, **rec})
    for name, m in results.items():
        sink.write({"step": len(trace) + 1, "split": "eval", "task": name, **m})
    sink.close()
    data_note = str(opt.data) if opt.data else "each task's eval split (first run's recipe)"
    write_json(out / "eval.json", {"step": 0, "data": data_note, "tasks": results})
    summary = {
        "recipe": merger.recipe.name,
        "merge": {"method": opt.method, "runs": [str(it.path) for it in items], **info},
        "parameters": count_parameters(final),
        "precision": run.precision.describe(),
        "wall_time_s": time.perf_counter() - wall0,
        "eval": results,
    }
    write_json(out / "summary.json", summary)
    if console is not None:
        kept = info.get("kept")
        note = f", kept {len(kept)}/{len(items)}" if kept is not None else ""
        console.print(metrics_table(f"merge {opt.method}{note}: eval ({data_note})", results))
        console.print(f"-> {out}")
    return summary
