"""What a recipe's tasks are before any model exists: their loaded data, the adapters and
head each needs (HeadSpec) from that data and its tokenizer, and each split encoded as the
trainer feeds it (`encode_task`: the estimate's runtime child measures the same encodings).

Both the trainer (train/setup.py builds the model from these specs) and the cost model
(estimate/shapes.py prices them without building anything) need it, so it sits below both;
it joins data/ and models/, which are siblings that must not import each other.
"""

from __future__ import annotations

from typing import Any

from bitblend.config.schema import Recipe, TaskConfig
from bitblend.data.modalities import EncodedSplit, TabularStats, encode_packed, encode_split
from bitblend.data.packing import PACKABLE_HEADS, packing_enabled
from bitblend.data.sources import LM_HEADS, TaskData, load_task_data
from bitblend.errors import BitblendError
from bitblend.models.features import quantile_edges
from bitblend.models.trunk import HeadSpec


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


def audio_spec(task: TaskConfig, spec: HeadSpec, i: int) -> None:
    """Fill the audio front end and patch grid of `spec` from the task's keys (checked)."""
    where = f"tasks[{i}]"
    if task.sample_rate < 1000:
        raise BitblendError(
            f"{where}.sample_rate: expected at least 1000 Hz, got {task.sample_rate}"
        )
    if task.clip_seconds <= 0:
        raise BitblendError(f"{where}.clip_seconds: expected > 0, got {task.clip_seconds}")
    if task.n_mels < 1 or task.patch_mels < 1 or task.n_mels % task.patch_mels:
        raise BitblendError(
            f"{where}.patch_mels: {task.patch_mels} does not divide n_mels {task.n_mels}; "
            "expected a divisor"
        )
    if task.patch_frames < 1:
        raise BitblendError(f"{where}.patch_frames: expected >= 1, got {task.patch_frames}")
    spec.sample_rate, spec.n_mels = task.sample_rate, task.n_mels
    spec.num_samples = max(1, round(task.clip_seconds * task.sample_rate))
    spec.patch_frames, spec.patch_mels = task.patch_frames, task.patch_mels
    spec.spec_augment = task.spec_augment
    spec.audio_norm = task.audio_norm


def head_spec(
    task: TaskConfig, data: TaskData, tokenizer: Any, own_vocab: bool, i: int
) -> HeadSpec:
    """The adapters and head a task needs, from its data and tokenizer."""
    mods = data.train.modalities
    if task.packing and task.head not in PACKABLE_HEADS:
        raise BitblendError(
            f"tasks[{i}].packing: true needs a causal_lm or masked_lm head, not {task.head}"
        )
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
        spec.feature_embedding = task.feature_embedding
        if task.feature_embedding == "piecewise":
            spec.tabular_bins = quantile_edges(stats.apply(data.train.tabular))
    if data.train.audio is not None:
        audio_spec(task, spec, i)
    if own_vocab:
        spec.text_vocab = len(tokenizer)
    if task.shortcut:
        if task.head not in ("classification", "binary", "multilabel", "regression") or (
            "text" in mods
        ):
            raise BitblendError(
                f"tasks[{i}].shortcut: needs image or tabular inputs (no text) and a "
                f"classification, binary, multilabel or regression head; {task.name} has "
                f"{'+'.join(mods)} inputs and a {task.head} head"
            )
        spec.shortcut = True
    return spec


def encode_task(
    task: TaskConfig, spec: HeadSpec, table: Any, targets: Any, tokenizer: Any, recipe: Recipe
) -> EncodedSplit:
    """Encode one split of one task with its tokenizer, patch size and tabular statistics."""
    import numpy as np

    if packing_enabled(task) and table.text is not None and spec.modalities == ["text"]:
        texts = ["" if t is None else str(t) for t in table.text]
        length = task.max_length or recipe.model.max_length
        return encode_packed(tokenizer, texts, task.head, length, np.asarray(targets))
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
        audio=(spec.sample_rate, spec.num_samples, spec.audio_patches)
        if spec.audio_patches
        else None,
    )
