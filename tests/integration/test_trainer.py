"""The trainer against first principles: a plain PyTorch loop, grad accumulation, resume."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bitblend.config.load import read_yaml, recipe_from_dict
from bitblend.data.modalities import collate
from bitblend.precision.recipes import build_precision
from bitblend.taskspec import load_data
from bitblend.train.setup import build_model, build_tasks, convert_model
from bitblend.train.trainer import Trainer
from tests.conftest import make_recipe

# Every test here trains through the Trainer (seconds each on 2 CPU cores).
pytestmark = pytest.mark.slow


def _train(recipe, run_dir: Path) -> Trainer:
    trainer = Trainer(recipe, run_dir, show_progress=False)
    trainer.fit()
    return trainer


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step}" / "model.safetensors"))


def test_trainer_equals_plain_pytorch_loop(tmp_path: Path) -> None:
    """32-true: bitblend's final weights equal a hand-written loop's, bit for bit."""
    recipe = make_recipe("train.steps=6", "schedule.warmup_steps=2", "train.max_grad_norm=1.0")
    trainer = _train(recipe, tmp_path / "run")

    # The seed's loop, written out: same init, same batches, AdamW, linear warmup/decay, clip.
    datas = load_data(recipe)
    model, tok, _ = build_model(recipe, datas)
    # The model the Trainer trains: with model.kernels=auto, one fused q/k/v matmul per
    # block (its sums round differently from three separate matmuls).
    convert_model(model, recipe, build_precision(recipe.precision, torch.device("cpu")))
    task = build_tasks(recipe, datas, model, tok, {}, contextlib.nullcontext, torch.device("cpu"))[
        0
    ]
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=1e-3,
        fused=True,
    )
    total, warm = 6, 2
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / (warm + 1) if s < warm else 1 - (s - warm) / (total - warm)
    )
    model.train()
    for _ in range(total):
        batch = collate(task.train, task.sampler.next(), tok.pad_token_id, 8)
        logits = model("bbc", batch["input_ids"], batch["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad()
        sched.step()

    mine = trainer.model.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(mine[name], value), name


def test_grad_accumulation_4x2_equals_8x1(tmp_path: Path) -> None:
    """Two micro-batches of 4 give the same update as one batch of 8 (no dropout)."""
    common = ["model.dropout=0.0", "model.head_dropout=0.0", "train.steps=5"]
    a = _train(make_recipe(*common, "train.batch_size=8"), tmp_path / "a")
    b = _train(make_recipe(*common, "train.batch_size=4", "train.grad_accum=2"), tmp_path / "b")
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=1e-5)
    wa, wb = a.model.state_dict(), b.model.state_dict()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_resume_equals_straight_run_bitwise(tmp_path: Path, precision: str) -> None:
    """Stopping after step 4 and resuming gives the uninterrupted loss curve bit for bit."""
    recipe = make_recipe(
        f"precision.recipe={precision}",
        "train.steps=8",
        "train.checkpoint_every=4",
        "train.keep_checkpoints=0",
        "train.eval_every=2",
    )
    straight = tmp_path / "straight"
    _train(recipe, straight)

    # An interrupted run: everything on disk as it was right after checkpoint step-4.
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    for name in ("model", "checkpoints/step-8"):
        shutil.rmtree(cut / name)
    for name in ("eval.json", "summary.json"):
        (cut / name).unlink()
    resumed_recipe = recipe_from_dict(read_yaml(cut / "recipe.yaml"))
    Trainer(resumed_recipe, cut, resume=True, show_progress=False).fit()

    a, b = _losses(straight), _losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(5, 9)] == [b[s] for s in range(5, 9)]
    wa, wb = _weights(straight, 8), _weights(cut, 8)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    sa = load_file(str(straight / "checkpoints/step-8/state.safetensors"))
    sb = load_file(str(cut / "checkpoints/step-8/state.safetensors"))
    for name in sa:  # optimizer moments, RNG, masters
        assert torch.equal(sa[name], sb[name]), name


def test_bf16_mixed_tracks_fp32_loss_curve(tmp_path: Path) -> None:
    """bf16-mixed stays within 0.05 (mean 0.02) of the fp32 loss at every one of 20 steps."""
    common = ["train.steps=20", "model.dropout=0.0", "model.head_dropout=0.0"]
    _train(make_recipe(*common, "precision.recipe=32-true"), tmp_path / "fp32")
    _train(make_recipe(*common, "precision.recipe=bf16-mixed"), tmp_path / "bf16")
    a, b = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    diffs = np.array([abs(a[s] - b[s]) for s in a])
    assert diffs.max() < 0.05, diffs
    assert diffs.mean() < 0.02, diffs
    assert a[20] < a[1] and b[20] < b[1]  # both actually learn


def test_fp16_overflow_skips_step_lowers_scale_and_logs(tmp_path: Path) -> None:
    """16-mixed: an inf gradient skips that step, halves the scale, is logged and counted,
    and the LR schedule does not advance on it."""
    recipe = make_recipe("precision.recipe=16-mixed", "train.steps=5", "precision.init_scale=1024")
    with pytest.warns(UserWarning, match="16-mixed on a CPU"):
        trainer = Trainer(recipe, tmp_path / "run", show_progress=False)
    weight = trainer.model.heads["bbc"][1].weight
    # Poison the gradient during the 3rd step (trainer.step is 2 while it runs).
    weight.register_hook(lambda g: g * math.inf if trainer.step == 2 else g)
    summary = trainer.fit()

    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if r["split"] == "train"}
    assert [train[s]["skipped"] for s in range(1, 6)] == [False, False, True, False, False]
    assert train[3]["loss_scale"] == train[2]["loss_scale"] / 2
    assert train[4]["lr"] == train[3]["lr"]  # schedule held still on the skipped step
    assert train[3]["lr"] != train[2]["lr"]
    assert summary["skipped_steps"] == 1
    assert summary["precision"]["loss_scaler"] is True


def test_bf16_true_keeps_fp32_masters_and_learns(tmp_path: Path) -> None:
    """bf16-true: trunk weights are bf16, norms/heads fp32, the optimizer owns fp32 masters."""
    trainer = _train(make_recipe("precision.recipe=bf16-true", "train.steps=10"), tmp_path / "r")
    dtypes = {n: p.dtype for n, p in trainer.model.named_parameters()}
    assert dtypes["backbone.encoder.layer.0.attention.self.query.weight"] == torch.bfloat16
    assert dtypes["backbone.embeddings.LayerNorm.weight"] == torch.float32
    assert dtypes["heads.bbc.1.weight"] == torch.float32
    owned = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert all(p.dtype == torch.float32 for p in owned)
    losses = _losses(tmp_path / "r")
    assert np.mean([losses[s] for s in (8, 9, 10)]) < np.mean([losses[s] for s in (1, 2, 3)])
