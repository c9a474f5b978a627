"""Full fine-tune vs LoRA over a bf16 / int8 / NF4 frozen base: MiniLM-L6 on BBC News.

Each variant is one `bitblend train` of the `bbc` recipe (bf16-mixed) in its own subprocess
(so peak RSS is its own), read back from summary.json: held-out accuracy, tokens/s,
model-state bytes per parameter (weights + grads + optimizer states, at rest, measured by
the precision object) and peak memory. Variants run one after another in one invocation, so
their ratios come from one machine state; compare ratios, not absolute numbers.

    .venv/bin/python benchmarks/peft.py [--steps 80] [--batch 32] [--seq 128]
        [--eval-max 0] [--variants full,lora-bf16,lora-int8,lora-nf4] [--json OUT]
        [--estimate]   # also `bitblend estimate` each variant: predicted peak vs measured

LoRA: r 16, alpha 32, dropout 0.05 on query and value (the recipe defaults), lr 2e-3
(`--lora-lr`; at 5e-4 LoRA trailed the full fine-tune by 2.7 points after 80 steps, at 2e-3
it led by 0.9); the full fine-tune keeps the recipe's 1e-4.

    .venv/bin/python benchmarks/peft.py --decoder [--dec-pretrain-steps 150]
        [--dec-steps 60] [--dec-batch 8] [--dec-seq 128] [--dec-vocab 4096]
        [--dec-variants full,lora-bf16,lora-int8,lora-nf4] [--json OUT]

The decoder leg (`--decoder`, instead of the MiniLM leg): a LoRA fine-tune means something
only over a base that knows something, so it first pre-trains llama-15m (bf16-mixed,
causal_lm, packed) on a text mixture (BBC News and Reuters R8, mixed by temperature) with
its own BPE, then fine-tunes that run's `model/` (a local LlamaForCausalLM
directory) on another domain, the 2016 election tweets, as each variant: validation
perplexity on held-out tweets, tokens/s, model-state bytes per parameter and peak memory.
The pre-trained base's own perplexity on the tweets (no fine-tune) is the reference row.
`--dec-state` measures only the decoder's model-state bytes per variant (no data, seconds
each): full fine-tune, LoRA over each base with the LM head frozen (the default) or trained,
and where the bytes sit (adapters, LM head, token table, projections).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LORA = ["model.adapter.kind=lora"]
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "lora-bf16": [*LORA, "precision.base_bits=16"],
    "lora-int8": [*LORA, "precision.base_bits=8"],
    "lora-nf4": [*LORA, "precision.base_bits=4"],
}


def run_variant(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Train one variant in a subprocess; its summary.json figures."""
    sets = [
        "precision.recipe=bf16-mixed",
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch}",
        f"model.max_length={args.seq}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        *VARIANTS[name],
    ]
    if name != "full":
        sets.append(f"optimizer.lr={args.lora_lr}")
    if args.eval_max:
        sets.append(f"train.eval_max_examples={args.eval_max}")
    cmd = [sys.executable, "-m", "bitblend.cli", "train", "bbc", "--out", str(out), "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    ev = summary["eval"]["bbc_news"]
    trainable = _trainable(out)
    est = _estimate(sets) if args.estimate else {}
    return {
        **est,
        "variant": name,
        "accuracy": ev["accuracy"],
        "macro_f1": ev["macro_f1"],
        "tokens_per_s": summary["tokens_per_s"],
        "model_state_bytes_per_param": summary["model_state_bytes_per_param"],
        "model_state_mib": summary["model_state_bytes"] / 2**20,
        "peak_memory_gib": summary["peak_memory_bytes"] / 2**30,
        "parameters": summary["parameters"],
        "trainable": trainable,
        "wall_s": time.perf_counter() - t0,
        "sets": sets,
    }


def _estimate(sets: list[str]) -> dict[str, Any]:
    """`bitblend estimate` of the same recipe in a fresh process (its runtime is a user's):
    the process peak it predicts and the model state it counts."""
    cmd = [sys.executable, "-m", "bitblend.cli", "estimate", "bbc", "--json", "--precision",
           "recipe"]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"estimate failed:\n{proc.stderr[-3000:]}")
    m = json.loads(proc.stdout)["rows"][0]["memory"]
    state = m["weights"] + m["grads"] + m["master"] + m["optimizer_states"]
    return {"estimated_peak_gib": m["process_peak"] / 2**30, "estimated_state_mib": state / 2**20}


def _trainable(run: Path) -> int | None:
    """Trainable parameters: from the last checkpoint (adapter runs hold only those)."""
    from safetensors import safe_open

    ckpts = sorted((run / "checkpoints").glob("step-*"))
    if not ckpts:
        return None
    with safe_open(str(ckpts[-1] / "model.safetensors"), "pt") as f:
        return sum(_numel(f, k) for k in f.keys())  # noqa: SIM118  (safe_open: no __iter__)


def _numel(f: Any, key: str) -> int:
    n = 1
    for d in f.get_slice(key).get_shape():
        n *= d
    return n


# --- the decoder leg: llama-15m, pre-trained on a mixture, fine-tuned on another domain ---

# Two news sources (their text loads and tokenises in seconds; 20 Newsgroups and the
# standard library's source took over ten minutes to load on the busy 2-core machine).
PRETRAIN_DOMAINS = {"bbc_news": "bbc_news", "reuters_r8": "reuters_r8"}
FINETUNE_DOMAIN = "election_tweets"


def _train_recipe(name: str, recipe: dict[str, Any], out: Path, sets: list[str]) -> dict[str, Any]:
    """`bitblend train` of a recipe dict in a subprocess; its summary.json."""
    import yaml

    path = out.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    cmd = [sys.executable, "-m", "bitblend.cli", "train", str(path), "--out", str(out), "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


def _decoder_recipe(args: argparse.Namespace, backbone: str, tasks: dict[str, str],
                    steps: int, lr: float) -> dict[str, Any]:  # fmt: skip
    model: dict[str, Any] = {"backbone": backbone, "max_length": args.dec_seq}
    if not Path(backbone).is_dir():  # a llama-<size>: its BPE is trained on the recipe's text
        model["vocab_size"] = args.dec_vocab
    return {
        "name": "peft-decoder",
        "model": model,
        "tasks": [{"name": k, "data": v, "head": "causal_lm"} for k, v in tasks.items()],
        "mixing": {"strategy": "temperature", "temperature": 3.0},
        "precision": {"recipe": "bf16-mixed"},
        "optimizer": {"name": "adamw", "lr": lr},
        "schedule": {"name": "cosine", "warmup_ratio": 0.05},
        "train": {"steps": steps, "batch_size": args.dec_batch, "eval_every": 0,
                  "checkpoint_every": 0, "eval_max_examples": args.dec_eval_max, "seed": 0},
    }  # fmt: skip


def _base_perplexity(run: Path, args: argparse.Namespace) -> float:
    """The pre-trained base's validation perplexity on the fine-tune domain: one LoRA step
    at lr 1e-12 over the unquantised base (B starts at zero, so the model is the base to
    ~1e-12; the same eval split, examples and tokenizer as the variants)."""
    recipe = _decoder_recipe(args, str(run / "model"), {FINETUNE_DOMAIN: FINETUNE_DOMAIN}, 1,
                             1e-12)  # fmt: skip
    summary = _train_recipe("base-eval", recipe, run.parent / "base-eval", LORA)
    return float(summary["eval"][FINETUNE_DOMAIN]["perplexity"])


def decoder_leg(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Pre-train llama-15m on the mixture, then fine-tune it on the tweets per variant."""
    pre = tmp / "pretrain"
    recipe = _decoder_recipe(args, args.dec_backbone, PRETRAIN_DOMAINS, args.dec_pretrain_steps,
                             1e-3)  # fmt: skip
    t0 = time.perf_counter()
    summary = _train_recipe("pretrain", recipe, pre, [])
    ppl = {t: e["perplexity"] for t, e in summary["eval"].items()}
    rows: list[dict[str, Any]] = [{"variant": "pretrain", "perplexity": ppl,
                                   "tokens_per_s": summary["tokens_per_s"],
                                   "wall_s": time.perf_counter() - t0}]  # fmt: skip
    print(json.dumps(rows[-1]), flush=True)
    rows.append({"variant": "base (no fine-tune)", "val_perplexity": _base_perplexity(pre, args)})
    print(json.dumps(rows[-1]), flush=True)
    tune = {FINETUNE_DOMAIN: FINETUNE_DOMAIN}
    for name in args.dec_variants.split(","):
        lr = args.dec_full_lr if name == "full" else args.dec_lora_lr
        sets = [*VARIANTS[name]]
        if name != "full":
            sets.append(f"model.adapter.targets={args.dec_targets}")
        t0 = time.perf_counter()
        out = tmp / f"dec-{name}"
        summary = _train_recipe(name, _decoder_recipe(args, str(pre / "model"), tune,
                                                      args.dec_steps, lr), out, sets)  # fmt: skip
        rows.append({
            "variant": name,
            "val_perplexity": summary["eval"][FINETUNE_DOMAIN]["perplexity"],
            "tokens_per_s": summary["tokens_per_s"],
            "model_state_bytes_per_param": summary["model_state_bytes_per_param"],
            "model_state_mib": summary["model_state_bytes"] / 2**20,
            "peak_memory_gib": summary["peak_memory_bytes"] / 2**30,
            "parameters": summary["parameters"],
            "trainable": _trainable(out),
            "lr": lr,
            "wall_s": time.perf_counter() - t0,
            "sets": sets,
        })  # fmt: skip
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "sets"}), flush=True)
    print(f"{'variant':<20} {'val ppl':>8} {'tok/s':>7} {'B/param':>8} {'state MiB':>9} "
          f"{'peak GiB':>8} {'trainable':>10}")  # fmt: skip
    for r in rows[1:]:
        if "tokens_per_s" not in r:
            print(f"{r['variant']:<20} {r['val_perplexity']:>8.2f}")
            continue
        print(f"{r['variant']:<20} {r['val_perplexity']:>8.2f} {r['tokens_per_s']:>7.0f} "
              f"{r['model_state_bytes_per_param']:>8.2f} {r['model_state_mib']:>9.1f} "
              f"{r['peak_memory_gib']:>8.2f} {r['trainable'] or 0:>10}")  # fmt: skip
    return rows


# --dec-state variants: (name, adapter targets or None for the full fine-tune, base_bits,
# train the LM head, precision recipe, extra PrecisionConfig fields).
DEC_STATE: list[tuple[str, Any, int | None, bool, str, dict[str, Any]]] = [
    ("full", None, None, True, "bf16-mixed", {}),
    ("bf16 all-linear", "all-linear", 16, False, "bf16-mixed", {}),
    ("int8 all-linear", "all-linear", 8, False, "bf16-mixed", {}),
    ("nf4 all-linear", "all-linear", 4, False, "bf16-mixed", {}),
    ("nf4 all-linear +head", "all-linear", 4, True, "bf16-mixed", {}),
    ("bf16 q/v", ["q_proj", "v_proj"], 16, False, "bf16-mixed", {}),
    ("int8 q/v", ["q_proj", "v_proj"], 8, False, "bf16-mixed", {}),
    ("nf4 q/v", ["q_proj", "v_proj"], 4, False, "bf16-mixed", {}),
    ("nf4 q/v +head", ["q_proj", "v_proj"], 4, True, "bf16-mixed", {}),
    # What the adapters themselves cost: 8-bit Adam states, then bf16 adapter weights and
    # gradients with stochastic rounding (no fp32 master).
    ("nf4 all-linear 8-bit", "all-linear", 4, False, "bf16-mixed", {"state_bits": 8}),
    ("nf4 all-linear bf16-true 8-bit", "all-linear", 4, False, "bf16-true",
     {"state_bits": 8, "master_weights": False, "rounding": "stochastic"}),
]  # fmt: skip


def _state_parts(model: Any, total: int) -> dict[str, int]:
    """Model-state bytes by part: the weights as stored of the token table, the frozen
    projections, the LM head, the adapters and the rest (norms), then everything training
    adds on top (gradients, optimizer states, masters: `total` minus the weights), which
    belongs to what trains (the adapters, plus the head with +head)."""
    from bitblend.precision.base_weights import FrozenBaseEmbedding, FrozenBaseLinear

    def part(name: str) -> str:
        name = name.replace(".base_layer", "")
        if ".lora_" in name:
            return "adapters w"
        if name.startswith("heads."):
            return "lm head w"
        if "embed_tokens" in name:
            return "token table w"
        return "projections w" if "_proj" in name else "rest w"

    out: dict[str, int] = {}
    low: set[int] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, FrozenBaseLinear | FrozenBaseEmbedding):
            out[part(name)] = out.get(part(name), 0) + mod.stored_bytes()
            low.update(id(p) for p in mod.parameters())
    for name, p in model.named_parameters():
        if id(p) not in low:
            out[part(name)] = out.get(part(name), 0) + p.numel() * p.element_size()
    out["grads+optimizer"] = total - sum(out.values())
    return out


def decoder_state(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Model-state bytes of `--dec-backbone` with its causal_lm head (the checkpoint's
    LlamaForCausalLM lm_head): the full fine-tune and LoRA r 16 over each base, the LM head
    frozen (model.adapter.train_lm_head false, the default) or trained (+head); one AdamW
    step on a tiny batch: deterministic, no data. B/param divides by the base's parameters
    (adapters left out); `parts` says where the bytes are."""
    # Run as a script, this file's folder leads sys.path and `import peft` would find it.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import torch
    from transformers import LlamaForCausalLM

    from bitblend.config.schema import AdapterConfig, OptimizerConfig, PrecisionConfig
    from bitblend.models.adapters import add_lora
    from bitblend.models.llama import _SizedTokenizer, llama_config
    from bitblend.models.trunk import HeadSpec, MultiTaskModel
    from bitblend.optim.build import build_optimizer, param_roles
    from bitblend.precision.recipes import build_precision

    size, vocab, rows = args.dec_backbone.removeprefix("llama-"), args.dec_vocab, []
    wanted = args.dec_state_variants.split(",") if args.dec_state_variants else None
    for name, targets, bits, train_head, recipe, extra in DEC_STATE:
        if wanted is not None and name not in wanted:
            continue
        torch.manual_seed(0)
        lm = LlamaForCausalLM(llama_config(size, vocab, _SizedTokenizer(vocab), 0.0, "sdpa"))
        spec = HeadSpec("lm", "causal_lm", vocab, lm_head="LlamaForCausalLM")
        model = MultiTaskModel(lm.model, [spec], head_dropout=0.0)
        model.heads["lm"].load_state_dict(lm.lm_head.state_dict())
        base = sum(p.numel() for p in model.parameters())
        if targets is not None:
            add_lora(model, AdapterConfig(kind="lora", r=16, alpha=32, dropout=0.0,
                                          targets=targets, train_lm_head=train_head))  # fmt: skip
        cfg = PrecisionConfig(recipe=recipe, base_bits=bits, **extra)  # type: ignore[arg-type]
        precision = build_precision(cfg, torch.device("cpu"))
        precision.convert_module(model)
        roles = param_roles(model, model.is_new_parameter)
        opt = build_optimizer(precision.optimizer_parameters(model), OptimizerConfig(), roles,
                              cfg.state_bits)  # fmt: skip
        x = torch.randint(0, vocab, (1, 8))
        with precision.forward_context():
            out = model("lm", input_ids=x, attention_mask=torch.ones_like(x))
        precision.backward(out.float().logsumexp(-1).mean())
        precision.optimizer_step(opt, 1.0)
        state = precision.model_state_bytes(model, opt)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        parts = {k: round(v / base, 3) for k, v in _state_parts(model, state).items()}
        rows.append({"variant": name, "precision": recipe, "base_parameters": base,
                     "trainable": trainable, "model_state_mib": state / 2**20,
                     "bytes_per_param": state / base, "parts_b_per_param": parts})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    print(f"{'variant':<32} {'B/param':>8} {'state MiB':>9} {'trainable':>10}  by part (B/param)")
    for r in rows:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["parts_b_per_param"].items())
        print(f"{r['variant']:<32} {r['bytes_per_param']:>8.2f} {r['model_state_mib']:>9.1f} "
              f"{r['trainable']:>10}  {parts}")  # fmt: skip
    return rows


def main() -> None:
    """Run the variants and print a table (and JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--eval-max", type=int, default=0, help="eval examples (0 = all)")
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--estimate", action="store_true", help="also run `bitblend estimate` of each variant"
    )
    ap.add_argument("--decoder", action="store_true", help="the llama-15m leg instead")
    ap.add_argument("--dec-backbone", default="llama-15m", help="llama-tiny for a smoke run")
    ap.add_argument("--dec-pretrain-steps", type=int, default=150)
    ap.add_argument("--dec-steps", type=int, default=60)
    ap.add_argument("--dec-batch", type=int, default=8)
    ap.add_argument("--dec-seq", type=int, default=128)
    ap.add_argument("--dec-vocab", type=int, default=4096)
    ap.add_argument("--dec-eval-max", type=int, default=200)
    ap.add_argument("--dec-full-lr", type=float, default=3e-4)
    ap.add_argument("--dec-lora-lr", type=float, default=2e-3)
    ap.add_argument("--dec-targets", default="all-linear", help="all-linear or [q_proj,v_proj]")
    ap.add_argument("--dec-variants", default=",".join(VARIANTS))
    ap.add_argument("--dec-state", action="store_true", help="only the decoder's model state")
    ap.add_argument(
        "--dec-state-variants", default="", help="--dec-state: comma-separated names (all)"
    )
    args = ap.parse_args()
    if args.dec_state:
        state = decoder_state(args)
        if args.json:
            args.json.write_text(json.dumps(state, indent=2) + "\n")
        return
    if args.decoder:
        with tempfile.TemporaryDirectory() as tmp:
            dec = decoder_leg(args, Path(tmp))
        if args.json:
            args.json.write_text(json.dumps(dec, indent=2) + "\n")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            row = run_variant(name, args, Path(tmp) / name)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "sets"}), flush=True)
    head = (
        f"{'variant':<10} {'acc':>6} {'tok/s':>7} {'B/param':>8} {'state MiB':>9} "
        f"{'peak GiB':>8} {'trainable':>10}"
    )
    if args.estimate:
        head += f" {'est GiB':>8} {'error':>7} {'est state':>9}"
    print(head)
    for r in rows:
        line = (
            f"{r['variant']:<10} {r['accuracy']:>6.3f} {r['tokens_per_s']:>7.0f} "
            f"{r['model_state_bytes_per_param']:>8.2f} {r['model_state_mib']:>9.1f} "
            f"{r['peak_memory_gib']:>8.2f} {r['trainable'] or 0:>10}"
        )
        if args.estimate:
            err = r["estimated_peak_gib"] / r["peak_memory_gib"] - 1
            line += (
                f" {r['estimated_peak_gib']:>8.2f} {err:>+7.1%} {r['estimated_state_mib']:>9.1f}"
            )
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
