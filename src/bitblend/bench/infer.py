"""`bitblend bench-infer`: latency p50/p99, throughput and accuracy of a finished
transformer run under each serving precision (runs/serving.py).

On CUDA every timed forward is bracketed by `torch.cuda.synchronize` (bitblend/device.py),
since kernels run asynchronously and the clock would otherwise time only the launches.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bitblend.device import synchronize
from bitblend.runs.load import load_transformer_run


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def bench_infer(
    run_dir: Path,
    precisions: list[str],
    batch_sizes: list[int],
    iters: int,
    task_name: str | None = None,
    eval_limit: int = 512,
) -> list[dict[str, Any]]:
    """Latency p50/p99, throughput and eval accuracy of a run per serving precision."""
    rows: list[dict[str, Any]] = []
    reference: np.ndarray | None = None
    for prec in precisions:
        run = load_transformer_run(Path(run_dir), prec, "bench-infer")
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
                    # CUDA queues kernels and returns at once: synchronise before starting
                    # and before reading the clock, so each latency covers its own forward.
                    synchronize(run.device)
                    t0 = time.perf_counter()
                    model(task.name, **batch)
                    synchronize(run.device)
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
