"""Gradient accumulation on token-level heads (issue 14, item 2): the micro-batches of one
step add up to the step's per-token mean, so 4 x 2 gives the update of 8 x 1 however
ragged the sequences, for homogeneous and mixed batches alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from bitblend.config.load import apply_overrides, recipe_from_dict
from bitblend.config.schema import IGNORE
from bitblend.train import step as step_fn
from bitblend.train.trainer import Trainer

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Text and tagged words of very different lengths (1 to 14 words), as real files."""
    d = tmp_path_factory.mktemp("ragged")
    rng = np.random.default_rng(0)
    sents = [list(rng.choice(WORDS, size=int(rng.integers(1, 15)))) for _ in range(96)]
    pd.DataFrame({"text": [" ".join(s) for s in sents]}).to_csv(d / "text.csv", index=False)
    label = ["yes" if "alpha" in s else "no" for s in sents]
    pd.DataFrame({"text": [" ".join(s) for s in sents], "label": label}).to_csv(
        d / "cls.csv", index=False
    )
    with (d / "tags.jsonl").open("w") as fh:
        for s in sents:
            tags = ["G" if w.startswith(("g", "s")) else "O" for w in s]
            fh.write(json.dumps({"words": s, "tags": tags}) + "\n")
    return {"text": d / "text.csv", "cls": d / "cls.csv", "tags": d / "tags.jsonl"}


def _task(kind: str, files: dict[str, Path], name: str | None = None) -> dict:
    if kind == "causal_lm":
        return {"name": name or "clm", "data": str(files["text"]), "head": "causal_lm"}
    if kind == "masked_lm":
        return {"name": name or "mlm", "data": str(files["text"]), "head": "masked_lm"}
    if kind == "token_classification":
        return {"name": name or "tok", "data": str(files["tags"]), "head": kind,
                "text_column": "words", "label_column": "tags"}  # fmt: skip
    return {"name": name or "cls", "data": str(files["cls"])}


def _recipe(tasks: list[dict], backbone: str, *overrides: str) -> object:
    data = {
        "name": "accum",
        "model": {"backbone": backbone, "max_length": 64, "dropout": 0.0, "head_dropout": 0.0},
        "tasks": tasks,
        "precision": {"recipe": "32-true"},
        "optimizer": {"lr": 1e-3},
        "train": {"steps": 4, "batch_size": 8, "eval_max_examples": 16, "threads": 2},
    }
    return recipe_from_dict(apply_overrides(data, list(overrides)))


def _fit(recipe: object, path: Path) -> tuple[Trainer, dict[int, dict]]:
    trainer = Trainer(recipe, path, show_progress=False)  # type: ignore[arg-type]
    trainer.fit()
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return trainer, {r["step"]: r for r in rows if r["split"] == "train"}


def _pad_cat(batches: list[dict[str, torch.Tensor]], pad: int) -> dict[str, torch.Tensor]:
    """One batch holding the rows of `batches` (right-padded to the longest)."""
    seq = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad, "attention_mask": 0, "labels": IGNORE}
    if "segment_ids" in batches[0]:  # packed rows: padding is segment 0 at position 0
        fill.update(segment_ids=0, position_ids=0)
    return {
        k: torch.cat([F.pad(b[k], (0, seq - b[k].shape[1]), value=v) for b in batches])
        for k, v in fill.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("head", "backbone", "packing"),
    [("causal_lm", "tiny-gpt", False), ("masked_lm", "tiny-bert", False),
     ("token_classification", "tiny-bert", False),
     ("causal_lm", "llama-tiny", True), ("masked_lm", "tiny-bert", True)],
)  # fmt: skip
def test_accumulated_step_is_the_gradient_of_one_batch(
    files: dict[str, Path], tmp_path: Path, head: str, backbone: str, packing: bool
) -> None:
    """Two micro-batches (their own MLM masks) give the gradient and the logged loss of one
    forward over both, with the per-token mean taken over all their labelled tokens; packed
    rows too (documents per row differ, so labelled tokens per micro-batch do)."""
    recipe = _recipe([_task(head, files)], backbone, "train.batch_size=4", "train.grad_accum=2",
                     f"tasks.0.packing={str(packing).lower()}", "model.vocab_size=300")  # fmt: skip
    trainer = Trainer(recipe, tmp_path / "r", show_progress=False)  # type: ignore[arg-type]
    model, task = trainer.model, trainer.tasks[0]
    seed = recipe.train.seed  # type: ignore[attr-defined]
    sampler_state = task.sampler.state_dict()
    res = step_fn.homogeneous(model, trainer.precision, trainer.balancer, trainer.tasks, 0, 0,
                              seed, 2)  # fmt: skip
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    task.sampler.load_state_dict(sampler_state)
    halves = np.split(task.sampler.next(), 2)
    micro = [task.batch.collate(task.train, h, step_fn._generator(seed, 0, 0, m))
             for m, h in enumerate(halves)]  # fmt: skip
    counts = [int((b["labels"][:, 1:] if head == "causal_lm" else b["labels"]).ne(IGNORE).sum())
              for b in micro]  # fmt: skip
    assert counts[0] != counts[1]  # ragged: the old mean of means would weigh them wrongly
    batch = _pad_cat(micro, task.batch.pad_id)
    logits = model(task.name, **batch)
    labels = batch["labels"]
    if head == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE)  # fmt: skip
    loss.backward()
    assert res.losses[0] == pytest.approx(float(loss.detach()), rel=1e-5)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_causal_lm_4x2_equals_8x1_on_ragged_text(files: dict[str, Path], tmp_path: Path) -> None:
    a, la = _fit(_recipe([_task("causal_lm", files)], "tiny-gpt"), tmp_path / "a")
    b, lb = _fit(_recipe([_task("causal_lm", files)], "tiny-gpt", "train.batch_size=4",
                         "train.grad_accum=2"), tmp_path / "b")  # fmt: skip
    assert la.keys() == lb.keys()
    for step in la:
        assert la[step]["loss"] == pytest.approx(lb[step]["loss"], rel=1e-5)
    wa, wb = a.model.state_dict(), b.model.state_dict()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_mixed_token_and_pooled_tasks_4x2_equals_8x1(
    files: dict[str, Path], tmp_path: Path
) -> None:
    """Mixed batches, a token-level and a pooled task in every micro-batch: same per-task
    logged losses (per-token / per-example means of the step) and the same weights."""
    tasks = [_task("token_classification", files), _task("classification", files)]
    mix = ["mixing.batches=mixed", "mixing.strategy=round_robin"]
    a, la = _fit(_recipe(tasks, "tiny-bert", *mix), tmp_path / "a")
    b, lb = _fit(_recipe(tasks, "tiny-bert", *mix, "train.batch_size=4", "train.grad_accum=2"),
                 tmp_path / "b")  # fmt: skip
    for step in la:
        assert la[step]["task"] == "tok+cls"
        for name in ("tok", "cls"):
            assert la[step]["task_loss"][name] == pytest.approx(
                lb[step]["task_loss"][name], rel=1e-5
            )
    wa, wb = a.model.state_dict(), b.model.state_dict()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)
