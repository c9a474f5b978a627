"""Low-precision inference: which precision a finished run is served in, and how fast.

`bitblend predict --precision` and `bitblend bench-infer` use these. Serving precisions:
- run: the training recipe's forward (fp8 recipes serve in bf16-mixed: no fp8 GEMMs here)
- fp32: everything in fp32
- bf16: weights and matmuls in bf16 (norms and heads fp32), half the weight memory
- int8: dynamic quantisation of the trunk's Linear layers (int8 weights per channel,
  activations quantised per token at run time) with torchao; heads stay fp32
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from bitblend.config.schema import PrecisionConfig, PrecisionName
from bitblend.errors import BitblendError

INFER_PRECISIONS = ("run", "fp32", "bf16", "int8")


def inference_config(trained: PrecisionConfig, name: str) -> PrecisionConfig:
    """The precision recipe a run is served with (training-only settings reset)."""
    if name not in INFER_PRECISIONS:
        raise BitblendError(f"--precision {name}: expected one of {', '.join(INFER_PRECISIONS)}")
    base = replace(trained, state_bits=32, rounding="nearest", master_weights=True)
    if name == "run":
        if trained.recipe in ("fp8", "fp8-emulated"):
            return replace(base, recipe="bf16-mixed")
        return base
    serve: dict[str, PrecisionName] = {"fp32": "32-true", "bf16": "bf16-true", "int8": "32-true"}
    return replace(base, recipe=serve[name])


def quantize_int8(model: nn.Module) -> int:
    """Dynamic int8 quantisation of the trunk's Linear layers in place; returns how many."""
    from bitblend.optim.lowbit import quiet_import

    q = quiet_import("torchao.quantization", "lowbit", "--precision int8")
    names = {
        n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith("backbone.")
    }
    q.quantize_(
        model,
        q.Int8DynamicActivationInt8WeightConfig(),
        filter_fn=lambda m, fqn: fqn in names,
    )
    return len(names)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def bench_infer(
    run_dir: Any,
    precisions: list[str],
    batch_sizes: list[int],
    iters: int,
    task_name: str | None = None,
    eval_limit: int = 512,
) -> list[dict[str, Any]]:
    """Latency p50/p99, throughput and eval accuracy of a run per serving precision."""
    from bitblend.inference import LoadedRun, load_run

    rows: list[dict[str, Any]] = []
    reference: np.ndarray | None = None
    for prec in precisions:
        run = load_run(run_dir, prec)
        if not isinstance(run, LoadedRun):
            raise BitblendError(
                f"{run_dir}: bench-infer times transformer runs, not {type(run).__name__}"
            )
        _, task = run.task(task_name)
        table, targets = run.eval_split(task.name)
        table = table.take(np.arange(min(len(table), eval_limit)))
        targets = targets[: len(table)]
        split = run.encode(task, table, targets)
        spec = run.batch_spec(task)
        model = run.model.eval()
        out = run.outputs(task.name, table)
        pred = out.argmax(1) if out.shape[1] > 1 else (out[:, 0] > 0).astype(int)
        accuracy = float((pred == np.asarray(targets).reshape(len(pred), -1)[:, 0]).mean())
        if reference is None:
            reference = pred
        agreement = float((pred == reference).mean())
        for bs in batch_sizes:
            idx = np.arange(min(bs, len(split)))
            batch = spec.collate(split, idx)
            batch.pop("labels", None)
            lat: list[float] = []
            with torch.inference_mode(), spec.context():
                for i in range(iters + 2):
                    t0 = time.perf_counter()
                    model(task.name, **batch)
                    if i >= 2:  # two warm-up calls (allocator, oneDNN kernel selection)
                        lat.append(time.perf_counter() - t0)
            resolved = run.precision.describe()["recipe"] + ("+int8" if prec == "int8" else "")
            rows.append({
                "precision": prec,
                "resolved": resolved,
                "batch_size": len(idx),
                "p50_ms": 1e3 * _percentile(lat, 50),
                "p99_ms": 1e3 * _percentile(lat, 99),
                "examples_per_s": len(idx) / float(np.mean(lat)),
                "accuracy": accuracy,
                "agreement": agreement,
                "weight_bytes": _weight_bytes(model),
            })  # fmt: skip
    return rows


def _weight_bytes(model: nn.Module) -> int:
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        # torchao's quantised weights are tensor subclasses: count their inner tensors.
        inner = getattr(t, "__tensor_flatten__", None)
        if inner is not None and type(t) is not nn.Parameter and type(t) is not torch.Tensor:
            names, _ = inner()
            total += sum(_inner_bytes(getattr(t, n)) for n in names)
        else:
            total += t.numel() * t.element_size()
    return total


def _inner_bytes(t: Any) -> int:
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(_inner_bytes(getattr(t, n)) for n in names)
    return int(t.numel() * t.element_size())
