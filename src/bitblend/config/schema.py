"""The typed recipe schema: every field has a type, a default and a one-line doc.

`config/load.py` turns YAML into these dataclasses and rejects unknown keys, wrong types
and bad enum values with a message naming the path (`tasks[0].head: expected one of ...`).
`bitblend recipes --fields` and docs/recipes.md are generated from the docs below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

PrecisionName = Literal[
    "auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "fp8", "fp8-emulated"
]
HeadName = Literal[
    "classification",
    "binary",
    "multilabel",
    "regression",
    "token_classification",
    "masked_lm",
    "causal_lm",
]
# Heads whose labels are per token: data/ builds them, tasks/ normalises their losses by the
# labelled tokens; both sit above config/, so the shared convention lives here.
TOKEN_HEADS = ("token_classification", "masked_lm", "causal_lm")
IGNORE = -100  # label of positions that carry no loss (padding, special tokens, sub-words)
LossName = Literal["auto", "cross_entropy", "bce", "mse"]
ModalityName = Literal["auto", "text", "image", "tabular", "audio", "multimodal"]
OptimizerName = Literal["sgd", "adam", "adamw", "rmsprop"]
ScheduleName = Literal["constant", "linear", "cosine"]
MixingName = Literal[
    "proportional", "uniform", "temperature", "weights", "round_robin", "sequential", "dynamic"
]
BalancingName = Literal["sum", "static", "uncertainty", "famo", "upgrad", "pcgrad"]


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and its documentation."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def required(text: str) -> Any:
    """A dataclass field without a default (the recipe must set it)."""
    return field(metadata={"doc": text})


# precision.state_bits: "auto" is resolved per device (precision/state_bits.py)
StateBits = Literal["auto", 32, 16, 8, 4]


@dataclass(kw_only=True)
class AdapterConfig:
    """Parameter-efficient fine-tuning: LoRA adapters (peft) over a frozen backbone."""

    kind: Literal["none", "lora"] = doc(
        "none",
        "none = train every weight; lora = freeze the backbone and train low-rank adapters "
        "(peft) on the `targets` layers, plus the heads and modality adapters (docs/peft.md)",
    )
    r: int = doc(16, "lora: rank of each adapter (A is r x in, B is out x r)")
    alpha: float = doc(32.0, "lora: scaling numerator; the update is (alpha / r) * B @ A")
    dropout: float = doc(0.05, "lora: dropout on each adapter's input")
    targets: list[str] | Literal["all-linear"] = doc(
        ["query", "value"],
        "lora: layers to adapt, by module name suffix; query / key / value also name q_proj "
        "(Llama), q_lin (DistilBERT) and c_attn (GPT-2's fused q/k/v); or all-linear",
    )
    train_lm_head: bool = doc(
        False,
        "lora: also train the checkpoint's own LM head (causal_lm / masked_lm tasks on a "
        "backbone that comes with one: llama-<size>, a local LlamaForCausalLM / GPT-2 / "
        "BertForMaskedLM directory); false freezes it with the base, as peft and QLoRA do "
        "(no gradient, no optimizer state; stored bf16 for base_bits 16, int8 rows for 8 and "
        "4). A head tied to the token table (GPT-2) is that table: true trains the table. A "
        "fresh LM head (none in the checkpoint: tiny-gpt, MiniLM) trains either way",
    )


@dataclass(kw_only=True)
class ModelConfig:
    """The shared transformer trunk."""

    backbone: str = doc(
        "minilm",
        "`minilm` (pretrained MiniLM-L6), `tiny-bert`, `tiny-gpt`, `small-gpt` (random init), "
        "`llama-15m`, `llama-30m`, `llama-60m`, `llama-125m`, `llama-tiny` (Llama decoders, "
        "random init, BPE trained on the recipe's text; docs/llama.md), "
        "a local transformers model directory, or `tfidf-logreg` (TF-IDF + logistic "
        "regression with scikit-learn; text classification/binary tasks)",
    )
    max_length: int = doc(
        128, "longest tokenised input; longer texts are truncated (packed tasks: the row length)"
    )
    vocab_size: int = doc(
        8192,
        "llama-<size>: tokens of the byte-level BPE trained on the recipe's training text "
        "(at least 258: the 256 bytes and 2 special tokens)",
    )
    pooling: Literal["auto", "cls", "mean", "last"] = doc(
        "auto", "how a sequence becomes one vector: auto = mean for encoders, last for decoders"
    )
    dropout: float | None = doc(None, "override the backbone's hidden and attention dropout")
    attention_dropout: float | None = doc(
        None,
        "override only the attention-probability dropout (after `dropout`); 0 saves the "
        "attention mask's memory and draws (under model.kernels=torch it lets CPU SDPA keep "
        "its fused kernel: MiniLM steps ~1.05x faster here)",
    )
    head_dropout: float = doc(0.1, "dropout before each task head")
    kernels: Literal["auto", "torch"] = doc(
        "auto",
        "auto = bitblend's CPU attention and dropout-mask kernels on CPU (docs/benchmarks.md; "
        "MiniLM bf16 steps 1.61x faster here), PyTorch's SDPA and dropout elsewhere, and one "
        "matmul for each attention block's q/k/v projections (any device); torch = PyTorch's "
        "everywhere, separate q/k/v layers, as HF Trainer runs",
    )
    compile: Literal["auto", "blocks", "eager"] = doc(
        "auto",
        "torch.compile (inductor) of each transformer block for training: auto = blocks for "
        "model_type llama decoders of width >= 384 (llama-30m and up) on CPU with a C++ "
        "compiler, one process, 32-true / bf16-mixed / bf16-true, no LoRA, eager elsewhere "
        "(docs/llama.md); blocks = any backbone (tested in one process only); eager = none",
    )
    adapter: AdapterConfig = field(
        default_factory=AdapterConfig,
        metadata={"doc": "LoRA adapters over a frozen backbone (docs/peft.md)"},
    )
    tfidf_max_features: int | None = doc(
        50000, "tfidf-logreg: keep the N most frequent n-grams (null = all)"
    )
    tfidf_ngrams: int = doc(2, "tfidf-logreg: word n-grams of length 1 to N")
    logreg_c: float = doc(
        10.0, "tfidf-logreg: inverse L2 strength of the logistic regression (larger = less)"
    )


@dataclass(kw_only=True)
class TaskConfig:
    """One task: a data source, a head and a loss on top of the shared trunk."""

    name: str = required("unique task name, used in metrics and outputs")
    data: str = required(
        "built-in source (see docs/data.md), a CSV / JSONL / Parquet file, an HF "
        "save_to_disk directory, or an image folder (one sub-folder per class)"
    )
    eval_data: str | None = doc(None, "separate eval file; if unset, a seeded split of `data`")
    eval_fraction: float = doc(0.1, "share of `data` held out for eval when `eval_data` is unset")
    modality: ModalityName = doc(
        "auto",
        "auto = every modality the source has; or text, image, tabular, audio, multimodal",
    )
    head: HeadName = doc(
        "classification",
        "classification, binary, multilabel, regression, token_classification, masked_lm, "
        "causal_lm",
    )
    loss: LossName = doc(
        "auto", "auto = cross_entropy (classification, token, LM), bce (binary, multilabel), mse"
    )
    weight: float = doc(1.0, "multiplier on this task's loss (static loss weights)")
    text_column: str = doc("text", "column holding the input text (or word lists for tokens)")
    label_column: str = doc("label", "column holding the label (class, number, list of classes)")
    image_column: str | None = doc(None, "column holding image file paths (user files)")
    audio_column: str | None = doc(
        None, "column holding audio file paths, WAV / FLAC / OGG (user files)"
    )
    feature_columns: list[str] | None = doc(None, "numeric columns used as tabular features")
    image_size: int | None = doc(None, "resize images to this square size (default: as stored)")
    patch_size: int | None = doc(None, "image patch side in pixels (default: image_size / 4)")
    sample_rate: int = doc(16000, "audio: clips are mixed to mono and resampled to this rate (Hz)")
    clip_seconds: float = doc(
        1.0, "audio: clips are cut or padded to this length; patches of padding are masked"
    )
    n_mels: int = doc(64, "audio: mel bands of the log-mel spectrogram (25 ms window, 10 ms hop)")
    patch_frames: int = doc(8, "audio: time extent of one spectrogram patch, in 10 ms frames")
    patch_mels: int = doc(16, "audio: frequency extent of one spectrogram patch, in mel bands")
    spec_augment: bool = doc(
        False,
        "audio: SpecAugment while training (never in eval): two time masks of up to 10% of "
        "the frames and two frequency masks of up to n_mels / 8 bands, set to the clip mean",
    )
    audio_norm: Literal["clip", "band"] = doc(
        "clip",
        "audio: standardise each clip's log-mels over all frames and bands (clip), or each "
        "mel band over the clip's frames (band: per-utterance mean/variance normalisation)",
    )
    tokenizer: Literal["backbone", "wordpiece"] = doc(
        "backbone", "backbone's tokenizer, or a WordPiece vocabulary trained on this task's text"
    )
    wordpiece_vocab: int = doc(8000, "vocabulary size when tokenizer is wordpiece")
    batch_size: int | None = doc(None, "this task's batch size (homogeneous batches)")
    max_length: int | None = doc(None, "this task's max tokens (default: model.max_length)")
    max_examples: int | None = doc(None, "use at most this many training examples (seeded)")
    packing: bool | None = doc(
        None,
        "causal_lm / masked_lm: pack documents (EOS-separated) into full max_length rows, "
        "attention and positions kept within each document (docs/packing.md); null = on for "
        "causal_lm, off otherwise",
    )
    shortcut: bool = doc(
        False,
        "image / tabular tasks with a pooled head: add a linear model on the raw pixels / "
        "features to the head's logits (wide & deep), so a small task the mixture gives few "
        "steps starts from logistic regression's readout (docs/mixing.md)",
    )
    feature_embedding: Literal["linear", "periodic", "piecewise"] = doc(
        "linear",
        "tabular features -> tokens: linear (x * W_f + b_f), periodic (sin/cos of 16 "
        "trainable frequencies per feature, Linear, ReLU) or piecewise (piecewise-linear "
        "encoding over 16 quantile bins of the training split, Linear, ReLU); "
        "docs/mixing.md",
    )
    adapter: Literal["shared", "own"] = doc(
        "shared",
        "with model.adapter.kind lora: shared = this task trains the one shared adapter; own = "
        "its own LoRA adapter, routed by task in the forward (needs mixing.batches: "
        "homogeneous)",
    )
    streaming: bool | None = doc(
        None,
        "read `data` (a file, a directory or glob of shards) lazily instead of loading it "
        "whole: true, false, or null = stream when its shards total more than "
        "stream_threshold_mb (masked_lm / causal_lm tasks; docs/data.md, streaming)",
    )
    stream_threshold_mb: float = doc(
        1024.0, "streaming: null streams a language-model task whose data exceeds this size"
    )
    shuffle_buffer: int = doc(
        1024,
        "streamed data: rows are shuffled in windows of this many rows, and shards in a "
        "seeded order per epoch (0 = the files' order)",
    )
    stream_eval_rows: int = doc(
        512, "streamed data without eval_data: the first N rows of the first shard are eval"
    )
    data_errors: Literal["raise", "skip"] = doc(
        "raise",
        "sharded data: a bad row (not JSON, no text column, empty shard) stops the run with "
        "one line naming file and line (raise), or is skipped and counted in summary.json",
    )


@dataclass(kw_only=True)
class PrecisionConfig:
    """How arithmetic is done; see docs/precision.md."""

    recipe: PrecisionName = doc(
        "auto",
        "auto, 32-true, bf16-mixed, 16-mixed, bf16-true, fp8 (torchao, CUDA cc >= 8.9), "
        "fp8-emulated (e4m3/e5m2 quantise-dequantise on any device); auto never picks fp16 on CPU",
    )
    state_bits: StateBits = doc(
        32,
        "optimizer state width: 32, 16 (bf16, stored between steps), 8 (bitsandbytes, any "
        "optimizer with state), 4 (torchao, adam/adamw), auto (8 on CUDA, where "
        "bitsandbytes' update is a native kernel; 32 elsewhere)",
    )
    master_weights: bool = doc(True, "bf16-true: keep an fp32 master copy the optimizer updates")
    rounding: Literal["nearest", "stochastic", "kahan"] = doc(
        "nearest",
        "bf16-true without master weights: how updated weights are rounded to bf16 (stochastic "
        "rounding, or a bf16 Kahan compensation buffer keeping what rounding drops)",
    )
    keep_fp32: list[str] = doc(
        [],
        "module names or glob patterns (e.g. `backbone.encoder.layer.0.*`) kept in fp32 and out "
        "of fp8, on top of the defaults (norms, task heads, first and last layers for fp8)",
    )
    fp8_scaling: Literal["tensorwise", "rowwise"] = doc(
        "tensorwise", "fp8 / fp8-emulated: one scale per tensor, or one per row"
    )
    base_bits: Literal[16, 8, 4] | None = doc(
        None,
        "with model.adapter.kind lora: how the frozen backbone's Linear weights are stored "
        "(16 = bf16, 8 = int8 per row, 4 = NF4 via torchao), dequantised per matmul in the "
        "compute dtype; null = the recipe's own weight format",
    )
    init_scale: float = doc(65536.0, "16-mixed: initial loss scale")
    growth_interval: int = doc(2000, "16-mixed: steps without overflow before the scale doubles")
    min_loss_scale: float = doc(
        1.0, "16-mixed: a loss scale below this for `stuck_steps` steps in a row stops the run"
    )
    stuck_steps: int = doc(
        20,
        "every recipe: steps in a row that may be skipped for non-finite gradients before the "
        "run stops, naming the module that went non-finite first; 16-mixed: also steps the "
        "scale may stay below `min_loss_scale` (0 = never stop)",
    )


@dataclass(kw_only=True)
class OptimizerConfig:
    """The optimizer (the seed's GD, Adam, RMSprop, AdamW)."""

    name: OptimizerName = doc("adamw", "sgd (plain gradient descent), adam, adamw, rmsprop")
    lr: float = doc(5e-5, "peak learning rate")
    new_lr_scale: float = doc(
        1.0,
        "lr multiplier for parameters outside the pretrained trunk (task heads, modality "
        "adapters), which start from random init and learn slowly at a fine-tuning lr",
    )
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
    epochs: float | None = doc(
        None,
        "instead of steps: passes over the training data of all tasks together; steps = "
        "ceil(epochs x training examples / expected examples per step), fixed once the data "
        "is loaded (proportional mixing gives each task about this many epochs; the end of a "
        "run prints each task's). Give steps or epochs, not both",
    )
    batch_size: int = doc(
        32, "examples per micro-batch, all ranks together (each of N ranks takes 1/N of it)"
    )
    grad_accum: int = doc(1, "micro-batches per optimizer step")
    seed: int = doc(0, "seeds init, data order, splits and dropout")
    eval_every: int = doc(0, "evaluate every N steps (0 = only at the end)")
    eval_batch_size: int = doc(64, "examples per eval batch")
    eval_max_examples: int | None = doc(None, "evaluate on at most this many examples per task")
    checkpoint_every: int = doc(0, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = doc(2, "keep the newest N checkpoints (0 = keep all)")
    log_every: int = doc(1, "write a metrics.jsonl line every N steps")
    progress_every: int = doc(
        0,
        "output not a terminal (nohup, CI, `> log`): print a progress line every N steps "
        "(0 = by time only); a terminal shows a bar instead",
    )
    progress_seconds: float = doc(
        30.0, "output not a terminal: print a progress line at least every T seconds (0 = off)"
    )
    max_grad_norm: float | None = doc(1.0, "clip the global gradient norm (null = no clipping)")
    group_by_length: bool = doc(True, "batch similar lengths together to cut padding")
    pad_to_multiple_of: int = doc(8, "pad batch length to a multiple of this")
    device: Literal["auto", "cpu", "cuda"] = doc("auto", "auto = cuda when present, else cpu")
    threads: int | None = doc(
        None, "torch CPU threads (default: all cores; under torchrun: cores / local ranks)"
    )
    stream_workers: int = doc(
        1,
        "streamed tasks: DataLoader worker processes reading and tokenising ahead of the "
        "step (0 = one background thread)",
    )
    cpu_heap: bool = doc(
        True,
        "CPU on Linux: keep freed activation memory mapped between steps (glibc mallopt) "
        "instead of re-faulting it every step; MALLOC_* variables in the environment win",
    )
    baselines: Literal["auto", "off"] = doc(
        "auto",
        "auto: at the end, fit each task's simple scikit-learn baseline (TF-IDF + logistic "
        "regression for text, logistic regression / gradient-boosted trees for tabular, "
        "logistic regression on pixels for images, ridge for regression) on the run's own "
        "train split, score it on the rows the run evaluates, and show it beside the task's "
        "metric; off: skip",
    )
    head_refit: Literal["auto", "all", "off"] = doc(
        "auto",
        "at the end, refit classification / binary heads by L2 logistic regression on the "
        "final trunk's pooled features of the task's training split (strength chosen by "
        "cross-validation on that split; docs/mixing.md; a task's shortcut is fitted with "
        "its head, on the pooled features and the raw inputs): auto = image, tabular and "
        "audio tasks, all = text tasks too, off = keep the trained heads",
    )


@dataclass(kw_only=True)
class MixingConfig:
    """How tasks share the steps and the loss; see docs/mixing.md."""

    strategy: MixingName = doc(
        "proportional",
        "proportional (to size), uniform, temperature (n^(1/T)), weights, round_robin, "
        "sequential, dynamic (reweighted by held-out loss)",
    )
    temperature: float = doc(2.0, "temperature strategy: rate proportional to n^(1/T)")
    size_cap: int | None = doc(None, "temperature/proportional: cap each size at this (T5's K)")
    weights: dict[str, float] | None = doc(None, "weights strategy: task name -> weight")
    order: Literal["interleaved", "random"] = doc(
        "interleaved",
        "interleaved: deterministic, realised shares within one batch of target on every prefix;"
        " random: seeded draws",
    )
    batches: Literal["homogeneous", "mixed"] = doc(
        "homogeneous", "one task per step, or several tasks in every step's batch"
    )
    dynamic_every: int = doc(50, "dynamic: steps between reweightings")
    dynamic_eta: float = doc(1.0, "dynamic: step size of the multiplicative update")
    dynamic_floor: float = doc(0.05, "dynamic: minimum share of any task")
    dynamic_examples: int = doc(64, "dynamic: held-out examples per task to measure loss on")
    balancing: BalancingName = doc(
        "sum",
        "sum / static (weighted sum), uncertainty (Kendall 2018), famo, upgrad, pcgrad "
        "(torchjd; need batches: mixed)",
    )
    balancing_lr: float = doc(0.025, "learning rate of uncertainty / famo weights")
    grad_cosine_every: int = doc(0, "log cosine similarity of task gradients every N steps")


@dataclass(kw_only=True)
class DistributedConfig:
    """Multi-process training under torchrun; see docs/distributed.md."""

    strategy: Literal["auto", "none", "ddp", "fsdp2"] = doc(
        "auto",
        "auto = none for one process, ddp under torchrun with several; ddp (replicated "
        "weights, all-reduced gradients); fsdp2 (fully_shard per transformer block and at the "
        "root); none refuses to run with several processes",
    )
    timeout_s: float = doc(
        300.0,
        "seconds a collective waits for the other ranks before this rank gives up and exits "
        "non-zero (a dead or stuck rank ends the job instead of hanging it)",
    )
    find_unused_parameters: bool = doc(
        True,
        "ddp: let steps leave some parameters without gradient (other tasks' heads and "
        "adapters); false is faster for a single task whose every parameter is used",
    )


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
