"""Sharded (FSDP2) checkpoints through torch.distributed.checkpoint (DCP), beside the plain
single-file checkpoints of train/checkpoint.py.

Layout of `checkpoints/step-N/` written by FSDP2 ranks:
  dcp/          model + optimizer, one file per rank plus DCP's `.metadata` (reshardable:
                N ranks write, any M ranks read, DCP redistributes the shards)
  trainer.pt    everything else (scheduler, samplers, mixture, balancer, precision, RNG of
                every rank, counters), written by rank 0
  state.json    {"step": N, "format": "dcp"}, written last (list_checkpoints looks for it)
As for plain checkpoints, everything goes into `.tmp-step-N-*` and is renamed to `step-N`
only when every rank has finished, so a `step-N` directory is complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitblend.errors import BitblendError
from bitblend.fsutil import fsync_path
from bitblend.train.checkpoint import META_FILE
from bitblend.train.distributed import DistContext

DCP_DIR = "dcp"
STATE_PT = "trainer.pt"


def is_sharded(path: Path) -> bool:
    """True for a checkpoint written by FSDP2 ranks through DCP."""
    return (path / DCP_DIR).is_dir()


def check_format(path: Path, sharded: bool) -> None:
    """Refuse, in one line, a checkpoint whose layout the current strategy cannot read."""
    if is_sharded(path) and not sharded:
        raise BitblendError(
            f"{path}: written by distributed.strategy fsdp2 (sharded, DCP); resume it with "
            "--set distributed.strategy=fsdp2 (any number of processes)"
        )
    if sharded and not is_sharded(path):
        raise BitblendError(
            f"{path}: a single-file checkpoint (strategy none or ddp); resume it with "
            "distributed.strategy none or ddp, not fsdp2"
        )


def save_sharded(
    ctx: DistContext,
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> Path:
    """Every rank writes its shards of model + optimizer; rank 0 the rest; atomic rename."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp: Path | None = None
    if ctx.main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=root))
    tmp = Path(ctx.broadcast(str(tmp)))
    final = root / f"step-{step}"
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
        if ctx.main:
            rest = {k: v for k, v in state.items() if k != "optimizer"}
            torch.save(rest, tmp / STATE_PT)
            (tmp / META_FILE).write_text(json.dumps({"step": step, "format": "dcp"}))
        ctx.barrier()  # every rank's shard is on disk before the rename publishes it
        if ctx.main:
            for f in (tmp / DCP_DIR).iterdir():
                fsync_path(f)
            for f in (tmp / DCP_DIR, tmp / STATE_PT, tmp / META_FILE, tmp):
                fsync_path(f)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_path(root)
    except BaseException:
        if ctx.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_sharded(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, dict[str, Any]]:
    """Load this rank's shards (resharded from any world size); returns (step, state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    try:
        meta = json.loads((path / META_FILE).read_text())
        rest = torch.load(path / STATE_PT, map_location="cpu", weights_only=True)
        # The templates give DCP the shapes and this rank's placements to read into.
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / DCP_DIR))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BitblendError(f"{path}: unreadable sharded checkpoint ({first})") from None
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    return int(meta["step"]), {**rest, "optimizer": None}


def gather_replica(
    ctx: DistContext, model: nn.Module, build: Callable[[], nn.Module]
) -> nn.Module | None:
    """Every rank sends its shards; rank 0 gets an unsharded copy of the model (None
    elsewhere), built by `build` and loaded with the full state dict, to save_pretrained."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=opts)
    if not ctx.main:
        return None
    replica = build()
    replica.load_state_dict(full, strict=False)
    missing = set(replica.state_dict()) - set(full)
    if missing:
        raise BitblendError(f"model/: gathered weights lack {sorted(missing)[:3]}")
    return replica
