"""The typed recipe schema: every field has a type, a default and a one-line doc.

`config/load.py` turns YAML into these dataclasses and rejects unknown keys, wrong types
and bad enum values with a message naming the path (`tasks[0].head: expected one of ...`).
`bitblend recipes --fields` and docs/recipes.md are generated from the docs below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

PrecisionName = Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"]
HeadName = Literal["classification", "regression"]
LossName = Literal["auto", "cross_entropy", "mse"]
OptimizerName = Literal["sgd", "adam", "adamw", "rmsprop"]
ScheduleName = Literal["constant", "linear", "cosine"]
MixingName = Literal["proportional", "uniform", "round_robin"]


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and its documentation."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def required(text: str) -> Any:
    """A dataclass field without a default (the recipe must set it)."""
    return field(metadata={"doc": text})


@dataclass(kw_only=True)
class ModelConfig:
    """The shared transformer trunk."""

    backbone: str = doc(
        "minilm",
        "`minilm` (pretrained MiniLM-L6), `tiny-bert`, `tiny-gpt` (random init, for tests) "
        "or a local transformers model directory",
    )
    max_length: int = doc(128, "longest tokenised input; longer texts are truncated")
    pooling: Literal["auto", "cls", "mean", "last"] = doc(
        "auto", "how a sequence becomes one vector: auto = mean for encoders, last for decoders"
    )
    dropout: float | None = doc(None, "override the backbone's hidden and attention dropout")
    head_dropout: float = doc(0.1, "dropout before each task head")


@dataclass(kw_only=True)
class TaskConfig:
    """One task: a data source, a head and a loss on top of the shared trunk."""

    name: str = required("unique task name, used in metrics and outputs")
    data: str = required("built-in source (`bbc_news`) or a CSV / JSONL / Parquet file")
    eval_data: str | None = doc(None, "separate eval file; if unset, a seeded split of `data`")
    eval_fraction: float = doc(0.1, "share of `data` held out for eval when `eval_data` is unset")
    modality: Literal["text"] = doc("text", "input type (text for now)")
    head: HeadName = doc("classification", "classification or regression")
    loss: LossName = doc("auto", "auto = cross_entropy for classification, mse for regression")
    weight: float = doc(1.0, "multiplier on this task's loss")
    text_column: str = doc("text", "column holding the input text")
    label_column: str = doc("label", "column holding the label (class name/id or a number)")
    max_examples: int | None = doc(None, "use at most this many training examples (seeded)")


@dataclass(kw_only=True)
class PrecisionConfig:
    """How arithmetic is done; see docs/precision.md."""

    recipe: PrecisionName = doc(
        "auto", "auto, 32-true, bf16-mixed, 16-mixed, bf16-true (auto never picks fp16 on CPU)"
    )
    state_bits: Literal[32] = doc(32, "optimizer state width in bits (32 only, for now)")
    master_weights: bool = doc(True, "bf16-true: keep an fp32 master copy the optimizer updates")
    init_scale: float = doc(65536.0, "16-mixed: initial loss scale")
    growth_interval: int = doc(2000, "16-mixed: steps without overflow before the scale doubles")


@dataclass(kw_only=True)
class OptimizerConfig:
    """The optimizer (the seed's GD, Adam, RMSprop, AdamW)."""

    name: OptimizerName = doc("adamw", "sgd (plain gradient descent), adam, adamw, rmsprop")
    lr: float = doc(5e-5, "peak learning rate")
    weight_decay: float = doc(0.01, "decoupled for adamw, L2 for the others; never on bias/norm")
    momentum: float = doc(0.0, "sgd and rmsprop momentum (0 = plain gradient descent)")
    nesterov: bool = doc(False, "sgd: Nesterov momentum")
    betas: list[float] = doc([0.9, 0.999], "adam/adamw betas")
    eps: float = doc(1e-8, "adam/adamw/rmsprop epsilon")
    alpha: float = doc(0.99, "rmsprop smoothing constant")


@dataclass(kw_only=True)
class ScheduleConfig:
    """The learning-rate schedule; it advances only on steps that were taken."""

    name: ScheduleName = doc("linear", "constant, linear or cosine decay after warmup")
    warmup_steps: int = doc(0, "linear warmup steps (takes precedence over warmup_ratio)")
    warmup_ratio: float = doc(0.0, "warmup as a share of train.steps")
    min_lr_ratio: float = doc(0.0, "floor of the decay as a share of the peak lr")


@dataclass(kw_only=True)
class TrainConfig:
    """The loop."""

    steps: int = doc(100, "optimizer steps (skipped fp16 overflow steps count too)")
    batch_size: int = doc(32, "examples per micro-batch")
    grad_accum: int = doc(1, "micro-batches per optimizer step")
    seed: int = doc(0, "seeds init, data order, splits and dropout")
    eval_every: int = doc(0, "evaluate every N steps (0 = only at the end)")
    eval_batch_size: int = doc(64, "examples per eval batch")
    eval_max_examples: int | None = doc(None, "evaluate on at most this many examples per task")
    checkpoint_every: int = doc(0, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = doc(2, "keep the newest N checkpoints (0 = keep all)")
    log_every: int = doc(1, "write a metrics.jsonl line every N steps")
    max_grad_norm: float | None = doc(1.0, "clip the global gradient norm (null = no clipping)")
    group_by_length: bool = doc(True, "batch similar lengths together to cut padding")
    pad_to_multiple_of: int = doc(8, "pad batch length to a multiple of this")
    device: Literal["auto", "cpu", "cuda"] = doc("auto", "auto = cuda when present, else cpu")
    threads: int | None = doc(None, "torch CPU threads (default: all cores)")


@dataclass(kw_only=True)
class MixingConfig:
    """How tasks share steps (more strategies arrive with #3)."""

    strategy: MixingName = doc(
        "proportional", "proportional (to dataset size), uniform, round_robin"
    )


@dataclass(kw_only=True)
class DistributedConfig:
    """Multi-process training (arrives later)."""

    strategy: Literal["none"] = doc("none", "none (single process)")


@dataclass(kw_only=True)
class Recipe:
    """A whole training recipe."""

    name: str = doc("", "short name of the recipe")
    description: str = doc("", "one line shown by `bitblend recipes`")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "the trunk"})
    tasks: list[TaskConfig] = required("one or more tasks sharing the trunk")
    precision: PrecisionConfig = field(
        default_factory=PrecisionConfig, metadata={"doc": "precision recipe"}
    )
    optimizer: OptimizerConfig = field(
        default_factory=OptimizerConfig, metadata={"doc": "optimizer"}
    )
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata={"doc": "lr plan"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "loop settings"})
    mixing: MixingConfig = field(default_factory=MixingConfig, metadata={"doc": "task mixing"})
    distributed: DistributedConfig = field(
        default_factory=DistributedConfig, metadata={"doc": "multi-process"}
    )
