"""Building what a run needs from a recipe: device, data, model, precision, optimizer.

Everything here may raise BitblendError and writes nothing, so a bad recipe or a bad data
file fails before a run directory exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bitblend.config.schema import Recipe, TaskConfig
from bitblend.data.modalities import EncodedSplit, encode_split
from bitblend.data.sampler import BatchSampler
from bitblend.data.sources import TaskData, load_task_data
from bitblend.errors import BitblendError
from bitblend.models.backbones import load_backbone, seed_everything
from bitblend.models.trunk import HeadSpec, MultiTaskModel
from bitblend.tasks.losses import resolve_loss


@dataclass
class TaskRuntime:
    """A task with its encoded data and its batch stream."""

    cfg: TaskConfig
    loss: str
    data: TaskData
    train: EncodedSplit
    eval: EncodedSplit
    sampler: BatchSampler

    @property
    def name(self) -> str:
        """Task name."""
        return self.cfg.name


def pick_device(choice: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise BitblendError("train.device: cuda requested but no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def head_spec(task: TaskConfig, data: TaskData) -> HeadSpec:
    """The head a task needs: one output per class, or one for regression."""
    if task.head == "classification":
        return HeadSpec(task.name, task.head, len(data.label_names), data.label_names)
    return HeadSpec(task.name, task.head, 1, [])


def load_data(recipe: Recipe) -> list[TaskData]:
    """Raw, split, label-mapped data of every task (checked row by row)."""
    return [load_task_data(task, i, recipe.train.seed) for i, task in enumerate(recipe.tasks)]


def build_tasks(recipe: Recipe, datas: list[TaskData], tokenizer: Any) -> list[TaskRuntime]:
    """Tokenise every task and give each its own seeded batch stream."""
    out = []
    global_batch = recipe.train.batch_size * recipe.train.grad_accum
    for i, (task, data) in enumerate(zip(recipe.tasks, datas, strict=True)):
        regression = task.head == "regression"
        ml = recipe.model.max_length
        train = encode_split(tokenizer, data.train.texts, data.train.labels, ml, regression)
        ev = encode_split(tokenizer, data.eval.texts, data.eval.labels, ml, regression)
        if len(train) < global_batch:
            raise BitblendError(
                f"tasks[{i}]: {len(train)} training examples is fewer than one batch of "
                f"{global_batch} (train.batch_size x train.grad_accum)"
            )
        sampler = BatchSampler(
            train.lengths, global_batch, recipe.train.seed, i, recipe.train.group_by_length
        )
        out.append(TaskRuntime(task, resolve_loss(task.head, task.loss), data, train, ev, sampler))
    return out


def build_model(recipe: Recipe, datas: list[TaskData]) -> tuple[MultiTaskModel, Any]:
    """The trunk and heads, seeded so the same recipe always starts from the same weights."""
    seed_everything(recipe.train.seed)
    backbone, tokenizer = load_backbone(recipe.model.backbone, recipe.model.dropout)
    specs = [head_spec(t, d) for t, d in zip(recipe.tasks, datas, strict=True)]
    model = MultiTaskModel(backbone, specs, recipe.model.pooling, recipe.model.head_dropout)
    return model, tokenizer
