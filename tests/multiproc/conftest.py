"""Helpers for multi-process tests: real torchrun + gloo subprocesses on tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

SRC = str(Path(__file__).resolve().parents[2] / "src")
# Every launch is bounded: a hang fails the test instead of the CI job.
BOUND_S = 420


def env() -> dict[str, str]:
    """The test's environment with this checkout's sources first, one thread per rank."""
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONPATH": SRC + (os.pathsep + path if path else ""),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m bitblend ARGS` as an argv list."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "bitblend", *args]  # fmt: skip


def run(cmd: list[str], timeout: float = BOUND_S) -> subprocess.CompletedProcess[str]:
    """Run `cmd` to completion within `timeout` seconds, capturing its output."""
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


def train(recipe: Path, out: Path, nproc: int | None, *extra: str) -> Path:
    """Train `recipe` into `out` (nproc None: plain `python -m bitblend`); must succeed."""
    args = ["train", str(recipe), "--out", str(out), "--quiet", *extra]
    if "--resume" in extra:
        args = ["train", "--quiet", *extra]
    cmd = [sys.executable, "-m", "bitblend", *args] if nproc is None else torchrun_cmd(nproc, *args)
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def write_recipe(path: Path, **sections: Any) -> Path:
    """A tiny-bert recipe without dropout (so 1 and N processes draw nothing differently)."""
    data: dict[str, Any] = {
        "name": "mp",
        "model": {"backbone": "tiny-bert", "max_length": 32, "dropout": 0.0, "head_dropout": 0.0},
        "tasks": [{"name": "bbc", "data": "bbc_news", "max_examples": 192}],
        "precision": {"recipe": "32-true"},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "schedule": {"name": "constant"},
        "train": {"steps": 6, "batch_size": 8, "eval_max_examples": 16, "seed": 3,
                  "checkpoint_every": 3, "keep_checkpoints": 0},
    }  # fmt: skip
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def train_losses(run_dir: Path) -> list[float]:
    """The per-step training loss of a run, in step order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines if x.strip()]
    return [r["loss"] for r in sorted(recs, key=lambda r: r["step"]) if r["split"] == "train"]


def assert_same_weights(
    a: Path, b: Path, rel: float = 1e-5, refitted: tuple[str, ...] = ()
) -> None:
    """Two model/ directories hold the same weights within `rel` (relative, whole model).

    `refitted`: tasks whose heads (and shortcuts) train.head_refit fitted at the end. That
    fit is a convex problem solved to a tolerance on features that differ between 1 and 2
    processes in their last bits (a matmul summed by 1 or 2 threads), so those heads are
    compared on their own, within 1e-2 relative; everything else within `rel`."""
    for name in ("model.safetensors", "heads.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert set(wa) == set(wb), name
        for t in refitted:
            for k in [k for k in wa if k.startswith((f"heads.{t}.", f"shortcuts.{t}."))]:
                x, y = wa.pop(k).double(), wb.pop(k).double()
                assert float((x - y).norm()) <= 1e-2 * float(x.norm()), k  # a zero bias: 0 <= 0
        diff = torch.cat([(wa[k].double() - wb[k].double()).flatten() for k in wa])
        ref = torch.cat([wa[k].double().flatten() for k in wa])
        assert float(diff.norm() / ref.norm()) < rel, name
        # Per tensor, looser: no tensor (a head, an adapter) may be wrong on its own. Adam
        # turns rounding noise in near-zero gradients (e.g. attention key biases, whose
        # exact gradient is 0) into +-lr steps, so tensors at noise level get an absolute floor.
        for k in wa:
            d = float((wa[k].double() - wb[k].double()).norm())
            assert d < 1e-3 * float(wa[k].double().norm()) + 1e-6 * wa[k].numel() ** 0.5, k


@pytest.fixture(scope="session")
def mp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory shared by the multiproc tests of one session (reference runs)."""
    return tmp_path_factory.mktemp("multiproc")
