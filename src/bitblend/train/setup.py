"""Building what a run needs from a recipe: device, data, model, per-task inputs.

Everything here may raise BitblendError and writes nothing, so a bad recipe or a bad data
file fails before a run directory exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from bitblend.config.schema import Recipe, TaskConfig
from bitblend.data.modalities import EncodedSplit, TabularStats, encode_split
from bitblend.data.sampler import BatchSampler
from bitblend.data.sources import LM_HEADS, TaskData, load_task_data

# pick_device lives in bitblend/device.py (every layer may use it); re-exported here for
# the trainer's existing import.
from bitblend.device import pick_device as pick_device
from bitblend.errors import BitblendError
from bitblend.models.attention import use_fast_dropout
from bitblend.models.backbones import is_decoder, load_backbone, seed_everything
from bitblend.models.fused_qkv import fuse_qkv
from bitblend.models.trunk import HeadSpec, MultiTaskModel
from bitblend.precision.base import Precision
from bitblend.tasks.losses import resolve_loss
from bitblend.train.evaluate import BatchSpec


@dataclass
class TaskRuntime:
    """A task with its tokenizer, encoded data and batch stream."""

    cfg: TaskConfig
    loss: str
    data: TaskData
    train: EncodedSplit
    eval: EncodedSplit
    sampler: BatchSampler
    tokenizer: Any
    batch: BatchSpec
    batch_size: int  # examples per micro-batch for this task (homogeneous batches)
    # (logits, hard-label loss, example indices) -> loss; set by `bitblend distill` only
    distill_loss: Callable[[torch.Tensor, torch.Tensor, np.ndarray], torch.Tensor] | None = None

    @property
    def name(self) -> str:
        """Task name."""
        return self.cfg.name


def load_data(recipe: Recipe) -> list[TaskData]:
    """Raw, split, label-mapped data of every task (checked row by row)."""
    return [load_task_data(task, i, recipe.train.seed) for i, task in enumerate(recipe.tasks)]


def _patch(task: TaskConfig, data: TaskData, i: int) -> int:
    assert data.train.image is not None
    size = data.train.image.shape[1]
    patch = task.patch_size or max(1, size // 4)
    if size % patch or data.train.image.shape[2] % patch:
        raise BitblendError(
            f"tasks[{i}].patch_size: {patch} does not divide the {size}x"
            f"{data.train.image.shape[2]} images; pick a divisor or set tasks[{i}].image_size"
        )
    return patch


def head_spec(
    task: TaskConfig, data: TaskData, tokenizer: Any, own_vocab: bool, i: int
) -> HeadSpec:
    """The adapters and head a task needs, from its data and tokenizer."""
    mods = data.train.modalities
    if (task.head in LM_HEADS or task.head == "token_classification") and mods != ["text"]:
        raise BitblendError(f"tasks[{i}].head: {task.head} needs text data only")
    outputs = {
        "classification": len(data.label_names),
        "multilabel": len(data.label_names),
        "token_classification": len(data.label_names),
        "masked_lm": len(tokenizer) if tokenizer is not None else 0,
        "causal_lm": len(tokenizer) if tokenizer is not None else 0,
    }.get(task.head, 1)
    spec = HeadSpec(task.name, task.head, outputs, data.label_names, mods)
    if data.train.image is not None:
        patch = _patch(task, data, i)
        spec.patch_dim = patch * patch * data.train.image.shape[3]
        spec.num_patches = (data.train.image.shape[1] // patch) * (
            data.train.image.shape[2] // patch
        )
    if data.train.tabular is not None:
        stats = TabularStats.fit(data.train.tabular)
        spec.num_features = data.train.tabular.shape[1]
        spec.tabular_mean, spec.tabular_std = stats.mean.tolist(), stats.std.tolist()
    if own_vocab:
        spec.text_vocab = len(tokenizer)
    return spec


def build_model(
    recipe: Recipe, datas: list[TaskData]
) -> tuple[MultiTaskModel, Any, dict[str, Any]]:
    """Trunk, adapters and heads (seeded), the backbone tokenizer, and per-task tokenizers."""
    seed_everything(recipe.train.seed)
    backbone, tokenizer = load_backbone(
        recipe.model.backbone,
        recipe.model.dropout,
        recipe.model.attention_dropout,
        recipe.model.kernels,
    )
    task_tokenizers: dict[str, Any] = {}
    specs = []
    for i, (task, data) in enumerate(zip(recipe.tasks, datas, strict=True)):
        if task.head == "causal_lm" and not is_decoder(backbone):
            raise BitblendError(
                f"tasks[{i}].head: causal_lm needs a decoder backbone (tiny-gpt or a GPT-style "
                f"model), {recipe.model.backbone} is bidirectional"
            )
        if task.head == "masked_lm" and is_decoder(backbone):
            raise BitblendError(
                f"tasks[{i}].head: masked_lm needs an encoder backbone, "
                f"{recipe.model.backbone} is causal"
            )
        own = task.tokenizer == "wordpiece"
        tok = tokenizer
        if own and data.train.text is not None:
            from bitblend.data.wordpiece import train_wordpiece

            tok = task_tokenizers[task.name] = train_wordpiece(
                [str(t) for t in data.train.text], task.wordpiece_vocab
            )
        uses_text = data.train.text is not None
        specs.append(head_spec(task, data, tok if uses_text else None, own and uses_text, i))
    model = MultiTaskModel(backbone, specs, recipe.model.pooling, recipe.model.head_dropout)
    if recipe.model.adapter.kind == "lora":  # freeze the backbone, LoRA on its targets (peft)
        from bitblend.models.adapters import add_lora

        add_lora(model, recipe.model.adapter, [t.name for t in recipe.tasks if t.adapter == "own"])
    if recipe.model.kernels == "auto":
        use_fast_dropout(model)  # CPU masks from models/attention.py; F.dropout elsewhere
    return model, tokenizer, task_tokenizers


def convert_model(model: nn.Module, recipe: Recipe, precision: Precision) -> None:
    """The precision recipe's conversion, then the kernel rewrites that must follow it:
    with model.kernels=auto, one matmul for each attention block's q/k/v projections.
    Layers fp8 swapped or keep_fp32 wrapped stay as they are (fuse_qkv takes only plain
    Linear triples of one dtype)."""
    precision.convert_module(model)
    if recipe.model.kernels == "auto":
        fuse_qkv(model)


def encode_task(
    task: TaskConfig, spec: HeadSpec, table: Any, targets: Any, tokenizer: Any, recipe: Recipe
) -> EncodedSplit:
    """Encode one split of one task with its tokenizer, patch size and tabular statistics."""
    import numpy as np

    stats = None
    if spec.num_features:
        stats = TabularStats(np.asarray(spec.tabular_mean), np.asarray(spec.tabular_std))
    patch = None
    if spec.patch_dim and table.image is not None:
        patch = round((spec.patch_dim / table.image.shape[3]) ** 0.5)
    return encode_split(
        table,
        task.head,
        targets,
        tokenizer=tokenizer,
        max_length=task.max_length or recipe.model.max_length,
        patch=patch,
        stats=stats,
    )


def build_tasks(
    recipe: Recipe,
    datas: list[TaskData],
    model: MultiTaskModel,
    tokenizer: Any,
    task_tokenizers: dict[str, Any],
    context: Any,
    device: torch.device,
) -> list[TaskRuntime]:
    """Tokenise every task and give each its own seeded batch stream."""
    out = []
    cfg = recipe.train
    for i, (task, data) in enumerate(zip(recipe.tasks, datas, strict=True)):
        spec = model.specs[task.name]
        tok = task_tokenizers.get(task.name, tokenizer)
        train = encode_task(task, spec, data.train, data.train_targets, tok, recipe)
        ev = encode_task(task, spec, data.eval, data.eval_targets, tok, recipe)
        micro = task.batch_size or cfg.batch_size
        global_batch = micro * cfg.grad_accum
        if len(train) < global_batch:
            raise BitblendError(
                f"tasks[{i}]: {len(train)} training examples is fewer than one batch of "
                f"{global_batch} (batch_size x train.grad_accum)"
            )
        sampler = BatchSampler(train.lengths, global_batch, cfg.seed, i, cfg.group_by_length)
        batch = BatchSpec(
            context=context,
            device=device,
            batch_size=cfg.eval_batch_size,
            pad_id=int(getattr(tok, "pad_token_id", 0) or 0),
            multiple=cfg.pad_to_multiple_of,
            mask_token=getattr(tok, "mask_token_id", None),
            vocab_size=len(tok) if tok is not None else 0,
        )
        loss = resolve_loss(task.head, task.loss)
        out.append(TaskRuntime(task, loss, data, train, ev, sampler, tok, batch, micro))
    return out
