"""Optimizers whose states are 8 or 4 bits wide, and their checkpointable state dicts.

8-bit: bitsandbytes (block-wise dynamic quantisation, Dettmers et al. 2022). Its CPU
kernels need no compiler and its state dict holds plain uint8/fp32 tensors, so it is the
choice on every platform. 4-bit: torchao's AdamW4bit / Adam4bit (bitsandbytes has no 4-bit
optimizer). torchao keeps states as tensor subclasses, which neither safetensors nor
`Optimizer.load_state_dict` (it would cast the uint8 codes to the parameter dtype) handle,
so `export_state` / `import_state` take them apart into plain tensors and back.

Tensors under 4096 elements keep 32-bit states in both libraries (per-block scales would
cost more than they save); that is bitsandbytes' and torchao's own rule.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from typing import Any

import torch

from bitblend.config.schema import OptimizerConfig
from bitblend.errors import BitblendError

log = logging.getLogger(__name__)

_AO_TAG = "__torchao_state__"


# On import these libraries log about GPU kernels a CPU build lacks (mxfp8, cutlass, triton,
# a hub kernels package): true but not actionable, and it would bury bitblend's own output.
_NOISY_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree")


def quiet_import(module: str, extra: str, field: str = "precision.state_bits") -> Any:
    """Import an optional low-precision library quietly, or say which extra installs it."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except ImportError:
        raise BitblendError(
            f"{field}: needs {module.split('.')[0]}; "
            f"install it with pip install 'bitblend[{extra}]'"
        ) from None


def stateless(cfg: OptimizerConfig) -> bool:
    """True when the optimizer keeps no per-parameter state (plain gradient descent)."""
    return cfg.name == "sgd" and cfg.momentum == 0.0


def check_state_bits(cfg: OptimizerConfig, bits: int) -> None:
    """Reject combinations no library implements, naming the fields to change."""
    if bits == 4 and cfg.name not in ("adam", "adamw"):
        raise BitblendError(
            f"precision.state_bits: 4-bit states exist for adam and adamw only "
            f"(optimizer.name is {cfg.name}); use state_bits 8 or optimizer.name adamw"
        )
    if bits == 8 and cfg.name == "rmsprop" and cfg.alpha == 0.0:
        raise BitblendError("precision.state_bits: 8-bit rmsprop needs optimizer.alpha > 0")


def build_lowbit(
    groups: list[dict[str, Any]], cfg: OptimizerConfig, bits: int
) -> torch.optim.Optimizer:
    """An 8-bit (bitsandbytes) or 4-bit (torchao) version of the optimizer `cfg` names."""
    check_state_bits(cfg, bits)
    betas = (cfg.betas[0], cfg.betas[1])
    if bits == 4:
        # torchao compiles its step function per parameter shape on first use.
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        ao = quiet_import("torchao.optim", "lowbit")
        cls = ao.AdamW4bit if cfg.name == "adamw" else ao.Adam4bit
        return cls(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    bnb = quiet_import("bitsandbytes.optim", "lowbit")
    if cfg.name == "adamw":
        return bnb.AdamW8bit(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    if cfg.name == "adam":
        return bnb.Adam8bit(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    if cfg.name == "rmsprop":
        return bnb.RMSprop8bit(
            groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum
        )
    return bnb.SGD8bit(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _is_subclass_state(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and type(value).__module__.startswith("torchao.")


def export_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with torchao's quantised states as plain tensors + metadata."""
    sd = optimizer.state_dict()
    # state_dict() shares each per-parameter dict with the live optimizer: copy before editing.
    sd["state"] = {pid: dict(per_param) for pid, per_param in sd["state"].items()}
    for per_param in sd["state"].values():
        for key, value in list(per_param.items()):
            if not _is_subclass_state(value):
                continue
            tag = f"{type(value).__module__}.{type(value).__qualname__}"
            _state_class(tag)  # a class resume would refuse fails here, at the first save
            names, ctx = value.__tensor_flatten__()
            per_param[key] = {
                _AO_TAG: tag,
                "tensors": {n: getattr(value, n) for n in names},
                "ctx": [_encode_ctx(c) for c in ctx],
            }
    return sd


def import_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load what `export_state` wrote, rebuilding torchao states after the plain load."""
    saved = [len(g["params"]) for g in sd["param_groups"]]
    built = [len(g["params"]) for g in optimizer.param_groups]
    if saved != built:
        # torch would raise a bare ValueError. Known cause: bf16-true runs with
        # master_weights false written before their decay groups were fixed (all no-decay).
        raise BitblendError(
            f"checkpoint optimizer: parameter groups of sizes {saved}, this run builds {built} "
            "(weight-decay / head-lr groups changed since the checkpoint was written, e.g. a "
            "bf16-true run with master_weights false from before its weight decay was fixed); "
            "start the run again"
        )
    rebuilt: dict[Any, dict[str, Any]] = {}
    plain_state: dict[Any, dict[str, Any]] = {}
    for pid, per_param in sd["state"].items():
        plain_state[pid] = {}
        for key, value in per_param.items():
            if isinstance(value, dict) and _AO_TAG in value:
                rebuilt.setdefault(pid, {})[key] = value
            else:
                plain_state[pid][key] = value
    for states in rebuilt.values():  # resolve every class before the optimizer changes
        for key, entry in states.items():
            states[key] = _rebuild(entry)
    optimizer.load_state_dict({**sd, "state": plain_state})
    if not rebuilt:
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, states in rebuilt.items():
        p = params[int(pid)]
        for key, value in states.items():
            optimizer.state[p][key] = value.to(p.device)


def _encode_ctx(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).replace("torch.", "")}
    if isinstance(value, torch.Size | tuple):
        return {"shape": list(value)}
    return value


def _decode_ctx(value: Any) -> Any:
    if isinstance(value, dict) and "dtype" in value:
        dtype = getattr(torch, str(value["dtype"]), None)
        if not isinstance(dtype, torch.dtype):  # only dtypes: not any attribute of torch
            raise BitblendError(f"optimizer state: {str(value['dtype'])[:40]!r} is not a dtype")
        return dtype
    if isinstance(value, dict) and "shape" in value:
        return tuple(value["shape"])
    return value


# The torchao state classes a checkpoint may name, as (module, class). A checkpoint is data
# read from disk: its tag is looked up here and never imported as given, so a crafted
# state.json cannot make bitblend import (and run) a module of its choosing.
STATE_CLASSES: dict[str, tuple[str, str]] = {
    f"torchao.optim.{m}.{c}": (f"torchao.optim.{m}", c)
    for m, c in (
        ("subclass_4bit", "OptimState4bit"),
        ("subclass_8bit", "OptimState8bit"),
        ("subclass_fp8", "OptimStateFp8"),
    )
}


def _state_class(tag: Any) -> Any:
    if not isinstance(tag, str) or tag not in STATE_CLASSES:
        raise BitblendError(
            f"optimizer state class {str(tag)[:80]!r} is not one bitblend saves "
            f"(expected one of {', '.join(sorted(STATE_CLASSES))})"
        )
    module, name = STATE_CLASSES[tag]
    return getattr(quiet_import(module, "lowbit"), name)


def _rebuild(entry: dict[str, Any]) -> torch.Tensor:
    cls = _state_class(entry[_AO_TAG])
    ctx = [_decode_ctx(c) for c in entry["ctx"]]
    return cls.__tensor_unflatten__(entry["tensors"], ctx, None, None)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer's per-parameter states occupy on this process (quantised codes +
    scales; an FSDP2-sharded state counts its local shard)."""
    seen: dict[tuple[int, int], int] = {}  # bitsandbytes shares one quantisation map
    for per_param in optimizer.state.values():
        for value in per_param.values():
            if hasattr(value, "to_local"):  # DTensor: this rank's shard
                value = value.to_local()
            if _is_subclass_state(value):
                names, _ = value.__tensor_flatten__()
                for n in names:
                    t = getattr(value, n)
                    seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
            elif isinstance(value, torch.Tensor):
                seen[(value.data_ptr(), value.numel())] = value.numel() * value.element_size()
    return sum(seen.values())
