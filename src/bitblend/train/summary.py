"""What a finished run's summary.json says about it: throughput and MFU of its steps,
memory, precision, the mixture's target vs realised shares, own tokenizers' [UNK] rates.
Functions of the Trainer (typed Any: train.trainer imports this module), reading its
state and changing nothing."""

from __future__ import annotations

import logging
from typing import Any

import torch

from bitblend.models.backbones import count_parameters
from bitblend.procmem import peak_rss_bytes

log = logging.getLogger(__name__)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this run: CUDA allocator peak on GPU, process peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()  # this program's own, not a launcher's (procmem.py)


def tokenizer_report(trainer: Any) -> dict[str, dict[str, float]]:
    """[UNK] rate on each own-vocabulary task's eval text: the backbone's vs its own."""
    from bitblend.data.wordpiece import unk_rate

    out = {}
    for t in trainer.tasks:
        own = trainer.task_tokenizers.get(t.name)
        if own is None or t.data.eval.text is None:
            continue
        texts = [str(x) for x in t.data.eval.text[:1000]]
        out[t.name] = {
            "backbone_unk_rate": unk_rate(trainer.tokenizer, texts),
            "own_unk_rate": unk_rate(own, texts),
            "own_vocab": len(own),
        }
        trainer.console.print(
            f"{t.name}: [UNK] rate {out[t.name]['backbone_unk_rate']:.1%} with the backbone's "
            f"tokenizer, {out[t.name]['own_unk_rate']:.2%} with its own WordPiece"
        )
    return out


def mixture_summary(trainer: Any) -> dict[str, Any]:
    """Target vs realised shares, examples and epochs per task (summary.json)."""
    names = [t.name for t in trainer.tasks]
    return {
        "strategy": trainer.recipe.mixing.strategy,
        "batches": trainer.recipe.mixing.batches,
        "balancing": trainer.recipe.mixing.balancing,
        "target": dict(zip(names, trainer.mixture.targets(), strict=True)),
        "realised": dict(zip(names, trainer.mixture.realised(), strict=True)),
        "examples": dict(zip(names, trainer.task_examples, strict=True)),
        "epochs": {t.name: t.sampler.epochs_completed for t in trainer.tasks},
        "synthetic": [t.name for t in trainer.tasks if t.data.synthetic],
    }


def run_summary(trainer: Any, evals: dict[str, dict[str, float]], wall: float) -> dict[str, Any]:
    # Achieved FLOP/s and MFU: model FLOPs of the real tokens processed (from the config,
    # once, here) against this machine's probed peak of the compute dtype (cached under
    # ~/.cache/bitblend; a first run probes for about a second). Never fails the run.
    from bitblend.estimate import run_performance

    examples = sum(trainer.task_examples)
    lm = sum(k for t, k in zip(trainer.tasks, trainer.task_examples, strict=True)
             if t.cfg.head in ("masked_lm", "causal_lm"))  # fmt: skip
    perf: dict[str, Any] = {"flops_per_s": None, "mfu": None, "peak_flops_per_s": None}
    try:
        perf = run_performance(
            trainer.model, trainer.tokens, examples, round(trainer.tokens * lm / max(examples, 1)),
            trainer.train_time, trainer.device, trainer.precision.describe()["compute_dtype"],
            trainer.progress.best_tokens_per_s,
        )  # fmt: skip
    except Exception as exc:  # a cost-model gap must not lose a finished run's summary
        log.warning("achieved FLOP/s not computed: %s", exc)
    return {
        **perf,
        "recipe": trainer.recipe.name,
        "steps": trainer.step,
        "skipped_steps": trainer.skipped,
        "tokens": trainer.tokens,
        "tokens_per_s": trainer.tokens / trainer.train_time if trainer.train_time else 0.0,
        "train_time_s": trainer.train_time,
        "wall_time_s": wall,
        "peak_memory_bytes": peak_memory_bytes(trainer.device),
        # weights + gradients + masters + Kahan buffers + optimizer states, at rest
        "model_state_bytes": trainer.model_state_bytes,
        "model_state_bytes_per_param": trainer.model_state_bytes
        / max(1, count_parameters(trainer.model)),
        "step_transient_bytes": trainer.precision.transient_bytes,
        "precision": trainer.precision.describe(),
        "parameters": count_parameters(trainer.model),
        "device": str(trainer.device),
        "threads": torch.get_num_threads(),
        "cpu_heap": trainer.cpu_heap,
        "compile": {"on": trainer.compiled, "why": trainer.compile_reason},
        "torch": torch.__version__,
        "task_steps": dict(zip([t.name for t in trainer.tasks], trainer.task_steps, strict=True)),
        "eval": evals,
    }
