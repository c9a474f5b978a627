"""Llama pre-training throughput: bitblend vs HF Trainer (bf16=True) vs a nanoGPT-style loop.

One Llama config (default llama-30m, sequence 512), one packed token stream: bitblend's
Trainer tokenises the corpus with its BPE and packs it (data/packing.py); the other two
systems train on exactly those rows, in the order bitblend's seeded sampler draws them,
from the same initial weights (the same seed builds the same LlamaForCausalLM). All three
use AdamW at a constant learning rate, weight decay 0, gradient clipping at 1.0, and
attention that stays inside each document:

- bitblend:  Trainer.train_step, `--precision` (default bf16-mixed), its own CPU kernels
- hf:        transformers.Trainer(bf16=True), rows with per-document position_ids (the
             packed path transformers detects), in bitblend's order (sequential sampler)
- nanogpt:   a hand-written loop: LlamaForCausalLM(position_ids, labels) under bf16
             autocast, fused AdamW, clip, step

tokens/s: real tokens of the timed steps (all but the first `--warmup`) over their wall
time. MFU: model FLOPs (6 x parameters + 12 x layers x width x seq per token, the same
formula for all three) over the probed bf16 matmul peak (bitblend.estimate.probe, taken in
this run). Validation loss: per-token cross-entropy on the same held-out packed rows, in
fp32, after the same steps (hence the same tokens).

Each system runs in a process of its own, as its users run it: bitblend with its CPU heap
settings (train/cpu_heap.py), the two others with glibc's defaults (`--baseline-heap tuned`
gives them bitblend's settings too: then the ratios show what is not the allocator). Every
process builds the same Trainer first (its tokenizer and packed rows; `train.cpu_heap` off
for the baselines). The peak probe runs in the parent.

The machine this was written on has 2 cores shared with other jobs: its figures swing up to
4x between runs; compare the ratios of one run only.

    python benchmarks/llm_pretrain.py [--size llama-30m] [--seq 512] [--batch 8]
        [--steps 20] [--warmup 3] [--data bbc_news] [--precision bf16-mixed]
        [--baseline-heap glibc|tuned] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Run as a script, benchmarks/ is sys.path[0]: its peft.py would shadow the peft package
# that transformers.Trainer imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]


def _recipe(args: argparse.Namespace) -> Any:
    from bitblend.config.load import recipe_from_dict

    return recipe_from_dict({
        "name": "llm-pretrain-bench",
        "model": {"backbone": args.size, "max_length": args.seq, "vocab_size": args.vocab},
        "tasks": [{"name": "lm", "data": args.data, "head": "causal_lm", "packing": True,
                   "max_examples": args.max_docs}],
        "precision": {"recipe": args.precision},
        "optimizer": {"name": "adamw", "lr": args.lr, "weight_decay": 0.0},
        "schedule": {"name": "constant", "warmup_ratio": 0.0},
        "train": {"steps": args.steps, "batch_size": args.batch, "max_grad_norm": 1.0,
                  "seed": 0, "group_by_length": False,
                  "cpu_heap": args.system == "bitblend" or args.baseline_heap == "tuned"},
    })  # fmt: skip


def _flops_per_token(config: Any, seq: int) -> float:
    layers, width = config.num_hidden_layers, config.hidden_size
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        n = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    n -= config.vocab_size * width  # the input embedding is a lookup, not a matmul
    return 6.0 * n + 12.0 * layers * width * seq


def _rows(split: Any, idx: np.ndarray) -> dict[str, torch.Tensor]:
    from bitblend.data.packing import packed_labels, segment_positions

    ids = torch.tensor([split.ids[i] for i in idx])
    seg = torch.tensor([split.segments[i] for i in idx])
    return {"input_ids": ids, "position_ids": segment_positions(seg),
            "labels": packed_labels(ids, seg), "segment_ids": seg}  # fmt: skip


@torch.no_grad()
def _val_loss(logits_fn: Any, rows: dict[str, torch.Tensor], batch: int) -> float:
    total, count = 0.0, 0
    for s in range(0, rows["input_ids"].shape[0], batch):
        part = {k: v[s : s + batch] for k, v in rows.items()}
        logits = logits_fn(part).float()[:, :-1]
        labels = part["labels"][:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=-100, reduction="sum"))  # fmt: skip
        count += int((labels != -100).sum())
    return total / count


def _hf_model(config: Any) -> Any:
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)  # bitblend seeds train.seed (0) before building the same class
    return LlamaForCausalLM(config)


def _hf_logits(model: Any) -> Any:
    from bitblend.models.packed import document_mask

    def fn(part: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=part["input_ids"], position_ids=part["position_ids"],
                     attention_mask=document_mask(part["segment_ids"], True)).logits  # fmt: skip

    return fn


def run_system(args: argparse.Namespace) -> dict[str, Any]:
    """One system (`args.system`) in this process: its step times, tokens and val loss."""
    from bitblend.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="llm-bench-"))
    trainer = Trainer(_recipe(args), tmp / "bitblend", show_progress=False)
    task = trainer.tasks[0]
    config = trainer.model.backbone.config
    order = copy.deepcopy(task.sampler)
    steps_idx = [order.next() for _ in range(args.steps)]  # the rows bitblend will draw
    full = [len(r) == args.seq for r in task.eval.ids]
    val = _rows(task.eval, np.flatnonzero(full)[: args.val_rows])
    out: dict[str, Any] = {"cpu_heap": trainer.cpu_heap}
    if args.system == "bitblend":
        ref_init = _hf_model(config)
        out["same_initial_weights"] = bool(torch.equal(
            ref_init.model.embed_tokens.weight, trainer.model.backbone.embed_tokens.weight.float()
        ))  # fmt: skip
        out["params"] = sum(p.numel() for p in ref_init.parameters())
        out["flops_per_token"] = _flops_per_token(config, args.seq)
        times, tokens = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            rec = trainer.train_step()
            times.append(time.perf_counter() - t0)
            tokens.append(int(rec["tokens"]))
        trainer.model.eval()
        loss = _val_loss(lambda p: trainer.model("lm", attention_mask=(p["segment_ids"] > 0).long(),
                                                 **{k: v for k, v in p.items() if k != "labels"}),
                         val, args.batch)  # fmt: skip
        return {**out, "times": times, "tokens": tokens, "val_loss": loss}
    model = _hf_model(config)
    if args.system == "nanogpt":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
        times, tokens = [], []
        for idx in steps_idx:
            b = _rows(task.train, idx)
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss_t = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                               labels=b["labels"]).loss  # fmt: skip
            loss_t.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            tokens.append(int((b["segment_ids"] > 0).sum()))
        model.eval()
        return {**out, "times": times, "tokens": tokens,
                "val_loss": _val_loss(_hf_logits(model), val, args.batch)}  # fmt: skip

    # -- HF Trainer ------------------------------------------------------------------------
    from torch.utils.data import Dataset, SequentialSampler
    from transformers import Trainer as HFTrainer
    from transformers import TrainerCallback, TrainingArguments

    flat = np.concatenate(steps_idx)

    class Rows(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(flat)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            r = _rows(task.train, flat[i : i + 1])
            return {k: r[k][0] for k in ("input_ids", "position_ids", "labels")}

    class Timer(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.times.append(time.perf_counter() - self.t0)

    class InOrder(HFTrainer):  # type: ignore[misc]
        def _get_train_sampler(self, *a: Any, **k: Any) -> Any:
            return SequentialSampler(self.train_dataset)

    timer = Timer()
    hf_args = TrainingArguments(
        output_dir=str(tmp / "hf"), per_device_train_batch_size=args.batch,
        max_steps=args.steps, learning_rate=args.lr, weight_decay=0.0,
        lr_scheduler_type="constant", max_grad_norm=1.0, bf16=True, use_cpu=True,
        report_to=[], save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
        seed=0, disable_tqdm=True,
    )  # fmt: skip
    InOrder(model=model, args=hf_args, train_dataset=Rows(), callbacks=[timer]).train()
    model.eval()
    per_step = [int((_rows(task.train, idx)["segment_ids"] > 0).sum()) for idx in steps_idx]
    return {**out, "times": timer.times, "tokens": per_step[: len(timer.times)],
            "val_loss": _val_loss(_hf_logits(model), val, args.batch)}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every system in a process of its own, one after the other; the probe in this one."""
    from bitblend.estimate.probe import measure

    out: dict[str, Any] = {"args": vars(args), "systems": {}}
    peaks = measure(torch.device("cpu"), budget=2.0)
    out["peak_bf16_flops"] = peak = peaks.matmul_flops.get("bfloat16", 0.0)
    for name in ("bitblend", "nanogpt", "hf"):
        # the same arguments (a child with --system writes no --out file)
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--system", name],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{name}: exit {proc.returncode}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        if name == "bitblend":
            for key in ("same_initial_weights", "params", "flops_per_token"):
                out[key] = res.pop(key)
        times, tokens = res.pop("times"), res.pop("tokens")
        t, k = sum(times[args.warmup :]), sum(tokens[args.warmup :])
        tps = k / t if t else 0.0
        out["systems"][name] = {
            "tokens_per_s": tps,
            "mfu": tps * out["flops_per_token"] / peak if peak else None,
            "tokens": sum(tokens),
            **res,
        }
        print(f"{name:9s} {tps:9.0f} tok/s  val loss {res['val_loss']:.4f}  "
              f"heap {'bitblend' if res['cpu_heap'] else 'glibc'}", flush=True)  # fmt: skip
    s = out["systems"]
    out["ratios"] = {
        "bitblend_vs_hf": s["bitblend"]["tokens_per_s"] / s["hf"]["tokens_per_s"],
        "bitblend_vs_nanogpt": s["bitblend"]["tokens_per_s"] / s["nanogpt"]["tokens_per_s"],
    }
    return out


def main() -> int:
    """Parse, run, print (and write) the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="llama-30m")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--data", default="bbc_news")
    ap.add_argument("--max-docs", type=int, default=None)
    ap.add_argument("--val-rows", type=int, default=32)
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline-heap", choices=("glibc", "tuned"), default="glibc")
    ap.add_argument(
        "--system",
        choices=("bitblend", "nanogpt", "hf"),
        help="run this one system here and print its raw figures (internal)",
    )
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.system:
        print(json.dumps(run_system(args)))
        return 0
    res = run(args)
    text = json.dumps(res, indent=2, default=lambda x: None if math.isnan(x) else x)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
