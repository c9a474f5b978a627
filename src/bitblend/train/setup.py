"""Building what a run needs from a recipe: device, data, model, per-task inputs.

Everything here may raise BitblendError and writes nothing, so a bad recipe or a bad data
file fails before a run directory exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bitblend.config.schema import Recipe, TaskConfig
from bitblend.data.modalities import EncodedSplit
from bitblend.data.packing import packing_enabled
from bitblend.data.sampler import BatchSampler
from bitblend.data.sources import LM_HEADS, TaskData

# pick_device lives in bitblend/device.py (every layer may use it); re-exported here for
# the trainer's existing import.
from bitblend.device import pick_device as pick_device
from bitblend.errors import BitblendError
from bitblend.models.attention import use_fast_dropout
from bitblend.models.backbones import is_decoder, load_backbone_with_head, seed_everything
from bitblend.models.fused_qkv import fuse_qkv
from bitblend.models.llama import tokenizer_corpus
from bitblend.models.trunk import HeadSpec, MultiTaskModel
from bitblend.precision.base import Precision
from bitblend.tasks.losses import resolve_loss
from bitblend.taskspec import encode_task, head_spec
from bitblend.train.evaluate import BatchSpec


@dataclass
class TaskRuntime:
    """A task with its tokenizer, encoded data and batch stream."""

    cfg: TaskConfig
    loss: str
    data: TaskData
    train: EncodedSplit
    eval: EncodedSplit
    sampler: Any  # BatchSampler, or StreamSampler for a streamed task (data/stream_loader.py)
    tokenizer: Any
    batch: BatchSpec
    batch_size: int  # examples per micro-batch for this task (homogeneous batches)
    # (logits, hard-label loss, example indices) -> loss; set by `bitblend distill` only
    distill_loss: Callable[[torch.Tensor, torch.Tensor, np.ndarray], torch.Tensor] | None = None

    @property
    def name(self) -> str:
        """Task name."""
        return self.cfg.name


def build_model(
    recipe: Recipe, datas: list[TaskData], saved_tokenizer: Path | None = None
) -> tuple[MultiTaskModel, Any, dict[str, Any]]:
    """Trunk, adapters and heads (seeded), the backbone tokenizer, and per-task tokenizers.

    `saved_tokenizer`: a resumed run's tokenizer directory (llama-<size> reuses it rather
    than training its BPE again)."""
    seed_everything(recipe.train.seed)
    # A language-model task on a checkpoint that has its own LM head starts from that head
    # (and its weight tying), not from a random one: fine-tuning a pretrained GPT / BERT
    # must start from the model the checkpoint is.
    lm = next((t.head for t in recipe.tasks if t.head in LM_HEADS), None)
    backbone, tokenizer, lm_head = load_backbone_with_head(
        recipe.model.backbone,
        lm,
        recipe.model.dropout,
        recipe.model.attention_dropout,
        recipe.model.kernels,
        vocab_size=recipe.model.vocab_size,
        texts=lambda: tokenizer_corpus([d.train.text for d in datas if d.train.text is not None]),
        saved_tokenizer=saved_tokenizer,
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
        spec = head_spec(task, data, tok if uses_text else None, own and uses_text, i)
        if lm_head is not None and task.head == lm and not own:
            if spec.num_outputs > lm_head.vocab:
                raise BitblendError(
                    f"model.backbone: {recipe.model.backbone}: its tokenizer has "
                    f"{spec.num_outputs} tokens, its LM head only {lm_head.vocab}"
                )
            spec.lm_head, spec.num_outputs = lm_head.arch, lm_head.vocab
        specs.append(spec)
    check_positions(recipe, backbone, specs)
    model = MultiTaskModel(backbone, specs, recipe.model.pooling, recipe.model.head_dropout)
    for spec in specs:
        if spec.lm_head and lm_head is not None:  # every such task starts from the checkpoint's
            model.heads[spec.task].load_state_dict(lm_head.module.state_dict())
    if recipe.model.adapter.kind == "lora":  # freeze the backbone, LoRA on its targets (peft)
        from bitblend.models.adapters import add_lora

        add_lora(model, recipe.model.adapter, [t.name for t in recipe.tasks if t.adapter == "own"])
    if recipe.model.kernels == "auto":
        use_fast_dropout(model)  # CPU masks from models/attention.py; F.dropout elsewhere
    return model, tokenizer, task_tokenizers


def check_positions(recipe: Recipe, backbone: nn.Module, specs: list[HeadSpec]) -> None:
    """Each task's longest input (text tokens + image patches + features, padded to
    train.pad_to_multiple_of) must fit the backbone's position table, or the first batch
    fails deep inside the model after the run directory exists."""
    cfg = getattr(backbone, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not isinstance(limit, int):
        return
    multiple = recipe.train.pad_to_multiple_of  # collate pads the text part to this
    for i, (task, spec) in enumerate(zip(recipe.tasks, specs, strict=True)):
        # appended after the text tokens
        extra = spec.num_patches + spec.num_features + spec.audio_patches
        text = (task.max_length or recipe.model.max_length) if "text" in spec.modalities else 0
        key = f"tasks[{i}].max_length" if task.max_length else "model.max_length"
        if -(-text // multiple) * multiple + extra <= limit:
            continue
        allowed = (limit - extra) // multiple * multiple
        if text == 0 or allowed < 1:
            raise BitblendError(
                f"tasks[{i}]: {extra} image/tabular/audio positions exceed the {limit} positions "
                f"of {recipe.model.backbone}; use fewer features or larger tasks[{i}].patch_size"
            )
        also = f" with {extra} image/tabular/audio positions" if extra else ""
        pad = (
            f" once padded to train.pad_to_multiple_of {multiple}" if text + extra <= limit else ""
        )
        raise BitblendError(
            f"{key}: {text} text positions{also}{pad} exceed the {limit} positions of "
            f"{recipe.model.backbone}; expected at most {allowed}"
        )


def convert_model(
    model: nn.Module, recipe: Recipe, precision: Precision, compiled: bool = False
) -> None:
    """The precision recipe's conversion, then the kernel rewrites that must follow it:
    with model.kernels=auto, one matmul for each attention block's q/k/v projections.
    Layers fp8 swapped or keep_fp32 wrapped stay as they are (fuse_qkv takes only plain
    Linear triples of one dtype). Blocks that will be compiled (train/compile.py) keep
    their three layers: fuse_qkv's hand-off between them is per-block Python state that
    torch.compile guards on, so each layer recompiled until the recompile limit left the
    rest eager (llama-30m: 0.72x of compiled blocks with separate layers)."""
    precision.convert_module(model)
    if recipe.model.kernels == "auto" and not compiled:
        fuse_qkv(model)


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
        ev = encode_task(task, spec, data.eval, data.eval_targets, tok, recipe)
        micro = task.batch_size or cfg.batch_size
        global_batch = micro * cfg.grad_accum
        sampler: Any
        train: EncodedSplit
        if data.stream is not None:  # data/stream_loader.py: rows tokenised ahead, lazily
            from bitblend.data.stream_loader import StreamedSplit, StreamSampler

            length = task.max_length or recipe.model.max_length
            packed = packing_enabled(task)
            estimate = data.stream.estimate
            if packed:  # rows per epoch = documents x packed rows per document of the sample
                sample = encode_task(task, spec, data.train, data.train_targets, tok, recipe)
                estimate = max(1, round(estimate * len(sample) / max(1, len(data.train))))
            train = StreamedSplit(task.head, np.zeros(0, np.float32), np.zeros(0, np.int64),
                                  estimate=estimate)  # fmt: skip
            sampler = StreamSampler(train, data.stream, tok, length, global_batch,
                                    cfg.stream_workers, cfg.seed * 1_000_003 + i,
                                    packed)  # fmt: skip
        else:
            train = encode_task(task, spec, data.train, data.train_targets, tok, recipe)
            if len(train) < global_batch:
                raise BitblendError(
                    f"tasks[{i}]: {len(train)} training examples is fewer than one batch of "
                    f"{global_batch} (batch_size x train.grad_accum)"
                )
            sampler = BatchSampler(train.lengths, global_batch, cfg.seed, i, cfg.group_by_length)
        loss = resolve_loss(task.head, task.loss)
        batch = _batch_spec(cfg, context, device, tok)
        out.append(TaskRuntime(task, loss, data, train, ev, sampler, tok, batch, micro))
    return out


def _batch_spec(cfg: Any, context: Any, device: torch.device, tok: Any) -> BatchSpec:
    return BatchSpec(
        context=context,
        device=device,
        batch_size=cfg.eval_batch_size,
        pad_id=int(getattr(tok, "pad_token_id", 0) or 0),
        multiple=cfg.pad_to_multiple_of,
        mask_token=getattr(tok, "mask_token_id", None),
        vocab_size=len(tok) if tok is not None else 0,
    )
