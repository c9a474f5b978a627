"""Atomic, complete checkpoints: tensors in safetensors, everything else in JSON.

A checkpoint is written into `checkpoints/.tmp-step-N-*`, every file fsynced, then renamed
to `checkpoints/step-N`: a directory named `step-N` is always complete. Nested state
(optimizer, scaler, sampler, RNG, precision) is flattened: each tensor goes into
`state.safetensors` under its path and is replaced by a reference in `state.json`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from bitblend.errors import BitblendError

_STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
META_FILE = "state.json"


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested structure by {"__tensor__": key}; tuples are tagged."""
    if isinstance(obj, torch.Tensor):
        # clone(): safetensors refuses two entries sharing one storage.
        tensors[path] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_flatten(k, f"{path}.k{i}", tensors), _flatten(v, f"{path}.{i}", tensors)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, float) and obj != obj:
        return {"__float__": "nan"}
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return {"__float__": str(obj)}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_tensors(
    model: nn.Module, keep: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """The model's state as distinct contiguous tensors (tied weights stored once); only the
    keys `keep` accepts when given (adapter runs: not the frozen base)."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[object, str] = {}
    for name, t in model.state_dict().items():
        if keep is not None and not keep(name):
            continue
        # Tied = the very same view (pointer incl. offset, shape, stride), not just one storage.
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride())) if t.numel() else id(t)
        if key in seen and t.numel():
            continue  # a tied weight: load_state_dict(strict=False) restores it through its twin
        seen[key] = name
        out[name] = t.detach().cpu().contiguous()
    return out


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    state: dict[str, Any],
    keep: Callable[[str], bool] | None = None,
) -> Path:
    """Write checkpoint `step-N` atomically (model keys `keep` accepts); returns its path."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=ckpt_root))
    try:
        save_file(model_tensors(model, keep), str(tmp / MODEL_FILE))
        tensors: dict[str, torch.Tensor] = {}
        meta = _flatten(state, "s", tensors)
        save_file(tensors, str(tmp / STATE_FILE))
        (tmp / META_FILE).write_text(json.dumps({"step": step, "state": meta}))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        final = ckpt_root / f"step-{step}"
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for d in ckpt_root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / META_FILE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep=0 keeps all)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    path: Path, model: nn.Module, keep: Callable[[str], bool] | None = None
) -> tuple[int, dict[str, Any]]:
    """Load weights into `model` (the keys `keep` accepts are required, the others stay as
    built); returns (step, the nested state dict)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
        tensors = load_file(str(path / STATE_FILE))
        weights = load_file(str(path / MODEL_FILE))
    except (OSError, ValueError, SafetensorError) as exc:
        raise BitblendError(f"{path}: unreadable checkpoint ({exc})") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {n for n in missing if (keep is not None and not keep(n)) or _is_tied(model, n, weights)}
    if set(missing) - tied or unexpected:
        raise BitblendError(
            f"{path}: checkpoint does not match the model "
            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return int(meta["step"]), _unflatten(meta["state"], tensors)


def _is_tied(model: nn.Module, name: str, saved: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    t0 = state[name]
    key = (t0.data_ptr(), tuple(t0.shape), tuple(t0.stride()))
    return any(
        k in saved and (t.data_ptr(), tuple(t.shape), tuple(t.stride())) == key
        for k, t in state.items()
        if k != name
    )
