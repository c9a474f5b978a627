"""The shared transformer trunk, per-task modality adapters, and per-task heads.

Text from the backbone's own tokenizer goes in as `input_ids` (the plain HF path). Every
other input becomes `inputs_embeds`: image patches through a linear projection, tabular
features as one token each (FT-Transformer style), text of a task with its own vocabulary
through its own embedding table, audio as log-mel time x frequency patches
(models/audio.py); the parts are concatenated with a learned modality-type
embedding and one attention mask, so a missing modality is masked, never zero-filled.

`model/` in a run directory is a transformers `save_pretrained` directory (so
`AutoModel.from_pretrained(run/model)` loads the trunk; when a language-model task uses
the checkpoint's own LM head, it is that LM class's checkpoint, trunk + head, so
`AutoModelForCausalLM` / `AutoModelForMaskedLM` load the fine-tuned LM) plus
`heads.safetensors` (the other heads, adapters, modality embedding), `bitblend.json` and
the tokenizer files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer

from bitblend.errors import BitblendError
from bitblend.models.audio import AudioEmbedding, LogMel, audio_patch_grid
from bitblend.models.backbones import (
    build_lm_head,
    hidden_size,
    is_decoder,
    load_lm_pretrained,
    save_lm_pretrained,
)
from bitblend.models.features import feature_embedding
from bitblend.models.packed import backbone_mask

HEADS_FILE = "heads.safetensors"
META_FILE = "bitblend.json"
MODALITY_IDS = {"text": 0, "image": 1, "tabular": 2, "audio": 3}
POOLED = ("classification", "binary", "multilabel", "regression")
LM = ("masked_lm", "causal_lm")


@dataclass
class HeadSpec:
    """What a task feeds the trunk and what its head predicts."""

    task: str
    head: str  # classification | binary | multilabel | regression | token_classification | ...
    num_outputs: int
    label_names: list[str] = field(default_factory=list)
    modalities: list[str] = field(default_factory=lambda: ["text"])
    patch_dim: int = 0  # image: values per patch
    num_patches: int = 0  # image: patches per image
    num_features: int = 0  # tabular: features per example
    # audio: the front end and patch grid (sample rate, samples per clip, mel bands, patch
    # frames x bands); SpecAugment while training
    sample_rate: int = 0
    num_samples: int = 0
    n_mels: int = 0
    patch_frames: int = 0
    patch_mels: int = 0
    spec_augment: bool = False
    audio_norm: str = "clip"  # LogMel standardisation: "clip" or "band"
    text_vocab: int = 0  # > 0: the task has its own tokenizer and text embedding of this size
    tabular_mean: list[float] = field(default_factory=list)  # training-set statistics,
    tabular_std: list[float] = field(default_factory=list)  # reused at predict time
    # LM heads: the transformers LM class (GPT2LMHeadModel, BertForMaskedLM, ...) whose head,
    # weight tying included, this task uses; "" = a fresh Linear (no head in the checkpoint).
    lm_head: str = ""
    # A linear model on the raw image pixels / tabular features added to the head's logits
    # (wide & deep): see LinearShortcut.
    shortcut: bool = False
    # How tabular features become tokens (models/features.py) and, for piecewise, the
    # per-feature bin edges (F lists of T + 1) on the standardised training features.
    feature_embedding: str = "linear"
    tabular_bins: list[list[float]] = field(default_factory=list)

    @property
    def raw_width(self) -> int:
        """Values per example of the non-text inputs (image pixels + tabular features)."""
        return self.num_patches * self.patch_dim + self.num_features

    @property
    def audio_patches(self) -> int:
        """Spectrogram patches per clip (0 without audio)."""
        if "audio" not in self.modalities:
            return 0
        t, f = audio_patch_grid(
            self.num_samples, self.sample_rate, self.n_mels, self.patch_frames, self.patch_mels
        )
        return t * f

    @property
    def uses_embeds(self) -> bool:
        """Whether inputs go through `inputs_embeds` rather than the backbone's ids path."""
        return self.modalities != ["text"] or self.text_vocab > 0


class PatchEmbedding(nn.Module):
    """Image patches -> tokens: linear projection plus a learned embedding per patch position
    (ViT). (B, P, patch_dim) -> (B, P, H). The position table tells the trunk where each
    patch sits in the image, which its text position embeddings alone learn only slowly."""

    def __init__(self, patch_dim: int, num_patches: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(patch_dim, width)
        self.position = nn.Parameter(torch.randn(max(1, num_patches), width) * 0.02)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(batch, patches, patch_dim) -> (batch, patches, width)."""
        x = self.proj(patches.to(self.proj.weight.dtype))
        return x + self.position[: x.shape[1]]


class LinearShortcut(nn.Module):
    """Logits of a linear model on the raw non-text inputs, added to the head's (wide &
    deep). Why: a small image or tabular task gets a few dozen steps in a mixture, and the
    trunk needs many more to learn a pixel/feature readout through new adapters (8x8
    digits: .61 after 45 steps of 32 alone) while logistic regression on the same inputs
    reaches .96; the shortcut gives the task that linear model from the first steps, and
    the trunk learns what is left. Zero-initialised: at step 0 the logits are the head's.
    (B, P, D) patches and/or (B, F) features -> (B, outputs)."""

    def __init__(self, in_features: int, outputs: int) -> None:
        super().__init__()
        # Zeros built directly: no draw from the RNG, so every other module of the model
        # gets the same init as without the shortcut.
        self.weight = nn.Parameter(torch.zeros(outputs, in_features))
        self.bias = nn.Parameter(torch.zeros(outputs))

    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, in_features): masked (missing = 0) pixels and features, flattened - what the
        Linear reads (train/head_refit.py fits it from these)."""
        parts = []
        if "image" in inputs:
            img = inputs["image"] * inputs["image_mask"].unsqueeze(-1)
            parts.append(img.flatten(1))
        if "tabular" in inputs:
            parts.append(inputs["tabular"] * inputs["tabular_mask"])
        return torch.cat(parts, dim=1).to(self.weight.dtype)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The raw inputs' features through one Linear."""
        return nn.functional.linear(self.features(inputs), self.weight, self.bias)


def embedding_rms(backbone: nn.Module) -> float:
    """RMS of the trunk's input-embedding table (MiniLM: 0.056): the scale new modality
    tokens start at, so that they look to the trunk like the tokens it was trained on."""
    table = backbone.get_input_embeddings()  # type: ignore[operator]
    return float(table.weight.detach().float().square().mean().sqrt())


class MultiTaskModel(nn.Module):
    """Backbone + per-task adapters and heads; `forward(task, **batch)` returns logits."""

    def __init__(
        self,
        backbone: nn.Module,
        specs: list[HeadSpec],
        pooling: str = "auto",
        head_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.specs = {s.task: s for s in specs}
        if pooling == "auto":
            pooling = "last" if is_decoder(backbone) else "mean"
        self.pooling = pooling
        self.head_dropout = head_dropout
        # Decoders build a KV cache on every forward unless told not to (config.use_cache is
        # True in saved Llama/GPT-2 configs): training and evaluation never read it back,
        # and under torch.compile each layer's cache object is a new guard (recompiles).
        self._backbone_kwargs: dict[str, Any] = {"use_cache": False} if is_decoder(backbone) else {}
        width = hidden_size(backbone)
        # Only models with non-text inputs need it (text-only models keep the plain HF
        # parameter set). Zero-initialised: adding it leaves a pretrained trunk unchanged.
        self.modality_embed: nn.Embedding | None = None
        if any(s.uses_embeds for s in specs):
            # Rows for text, image, tabular, and audio only when a task has audio: models
            # saved before audio existed hold a 3-row table and must still load.
            rows = len(MODALITY_IDS) if any("audio" in s.modalities for s in specs) else 3
            self.modality_embed = nn.Embedding(rows, width)
            nn.init.zeros_(self.modality_embed.weight)
        self.adapters = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self.shortcuts = nn.ModuleDict()  # task -> LinearShortcut (HeadSpec.shortcut)
        for s in specs:
            if s.shortcut:
                self.shortcuts[s.task] = LinearShortcut(s.raw_width, s.num_outputs)
            parts = nn.ModuleDict()
            if "image" in s.modalities:
                parts["image"] = PatchEmbedding(s.patch_dim, s.num_patches, width)
            if "tabular" in s.modalities:
                parts["tabular"] = feature_embedding(
                    s.feature_embedding, s.num_features, width, s.tabular_bins
                )
            if "audio" in s.modalities:
                parts["audio"] = AudioEmbedding(
                    s.sample_rate, s.num_samples, s.n_mels, s.patch_frames, s.patch_mels,
                    width, s.spec_augment, s.audio_norm, embedding_rms(backbone),
                )  # fmt: skip
            if s.text_vocab:
                parts["text"] = nn.Embedding(s.text_vocab, width)
            if len(parts):
                self.adapters[s.task] = parts
            if s.head in LM and s.lm_head:
                self.heads[s.task] = build_lm_head(backbone, s.lm_head)
            elif s.head in LM:
                self.heads[s.task] = nn.Linear(width, s.num_outputs)
            else:
                self.heads[s.task] = nn.Sequential(
                    nn.Dropout(head_dropout), nn.Linear(width, s.num_outputs)
                )

    @property
    def fp32_module_names(self) -> list[str]:
        """Modules a low-precision recipe keeps in fp32: classification/regression heads.

        Language-model heads (hidden x vocab) are the largest matmul of the model; they
        run in the compute dtype and their logits are upcast for the loss.
        """
        heads = [f"heads.{n}" for n, s in self.specs.items() if s.head not in LM]
        # The log-mel front ends (no weights) compute in fp32 too: see models/audio.py.
        return (
            heads
            + [f"shortcuts.{n}" for n in self.shortcuts]
            # sin(2 pi c x) and bin fractions lose their resolution in bf16 (8 bits of
            # mantissa); these adapters are a few hundred thousand parameters.
            + [
                f"adapters.{n}.tabular"
                for n, s in self.specs.items()
                if s.num_features and s.feature_embedding != "linear"
            ]
            + [
                f"adapters.{n}.audio.frontend"
                for n, s in self.specs.items()
                if "audio" in s.modalities
            ]
        )

    def take_audio_seconds(self) -> float | None:
        """Wall time the log-mel front ends spent since the last call (reset to 0); None
        when no task has audio. The trainer logs it beside the step time."""
        fronts = [m for m in self.modules() if isinstance(m, LogMel)]
        if not fronts:
            return None
        total = sum(m.seconds for m in fronts)
        for m in fronts:
            m.seconds = 0.0
        return total

    @property
    def lm_checkpoint_task(self) -> str | None:
        """The task whose (checkpoint-class) LM head is saved with the trunk as one
        transformers LM checkpoint in `model/`; None when no task has one."""
        return next((n for n, s in self.specs.items() if s.lm_head), None)

    def is_new_parameter(self, name: str) -> bool:
        """Whether a parameter starts from scratch (heads, adapters) rather than from the
        checkpoint (the trunk and a checkpoint's own LM heads)."""
        if name.startswith("backbone."):
            return False
        task = name.split(".")[1] if name.startswith("heads.") else None
        return not (task in self.specs and self.specs[task].lm_head)

    # -- inputs ------------------------------------------------------------------------
    def _embed(
        self, spec: HeadSpec, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenate every modality's tokens: (batch, seq, width) and mask (batch, seq)."""
        table = self.backbone.get_input_embeddings()  # type: ignore[operator]
        dtype = table.weight.dtype
        # ModuleDict has no .get()
        adapters: Any = self.adapters[spec.task] if spec.task in self.adapters else {}  # noqa: SIM401  # noqa: SIM401
        assert self.modality_embed is not None  # built whenever a spec uses embeds
        parts, masks = [], []
        if "input_ids" in inputs:
            ids = inputs["input_ids"]
            embed = adapters["text"] if "text" in adapters else table  # noqa: SIM401
            parts.append(embed(ids) + self.modality_embed.weight[0])
            masks.append(inputs["attention_mask"])
        if "image" in inputs:
            parts.append(adapters["image"](inputs["image"]) + self.modality_embed.weight[1])
            masks.append(inputs["image_mask"])
        if "tabular" in inputs:
            parts.append(adapters["tabular"](inputs["tabular"]) + self.modality_embed.weight[2])
            masks.append(inputs["tabular_mask"])
        if "audio" in inputs:
            tokens, present = adapters["audio"](inputs["audio"], inputs["audio_len"])
            parts.append(tokens + self.modality_embed.weight[3])
            masks.append(present)
        embeds = torch.cat([p.to(dtype) for p in parts], dim=1)
        return embeds, torch.cat(masks, dim=1)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(batch, seq, hidden) + (batch, seq) mask -> (batch, hidden)."""
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "last":
            # The last position whose mask is 1 (masks of concatenated modalities have holes).
            last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

    def forward(
        self,
        task: str,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **inputs: torch.Tensor,
    ) -> torch.Tensor:
        """Logits of `task`'s head: (batch, outputs), or (batch, seq, outputs) per token."""
        spec = self.specs[task]
        if input_ids is not None:
            inputs = {**inputs, "input_ids": input_ids, "attention_mask": attention_mask}  # type: ignore[dict-item]
        inputs.pop("labels", None)
        if spec.uses_embeds:
            embeds, mask = self._embed(spec, inputs)
            out = self.backbone(inputs_embeds=embeds, attention_mask=mask, **self._backbone_kwargs)
        elif "segment_ids" in inputs:  # packed rows (data/packing.py)
            mask = inputs["attention_mask"]
            segments, causal = inputs["segment_ids"], is_decoder(self.backbone)
            out = self.backbone(
                input_ids=inputs["input_ids"],
                attention_mask=backbone_mask(self.backbone, segments, causal),
                position_ids=inputs["position_ids"],
                **self._backbone_kwargs,
            )
        else:
            mask = inputs["attention_mask"]
            out = self.backbone(
                input_ids=inputs["input_ids"], attention_mask=mask, **self._backbone_kwargs
            )
        hidden = out.last_hidden_state
        if spec.head in POOLED:
            logits = self.heads[task](self.pool(hidden, mask))
            if task in self.shortcuts:
                logits = logits + self.shortcuts[task](inputs).to(logits.dtype)
            return logits
        return self.heads[task](hidden)

    # -- persistence -------------------------------------------------------------------
    def extra_state(self) -> dict[str, torch.Tensor]:
        """Every tensor outside the saved transformers checkpoint: heads, adapters,
        modality embedding. Left out: the trunk, the LM head saved with it, and head
        weights tied to the trunk's embeddings (rebuilt as ties on load)."""
        trunk = {p.data_ptr() for p in self.backbone.parameters()}
        lm_task = self.lm_checkpoint_task
        skip = f"heads.{lm_task}." if lm_task else None
        return {
            k: v.detach().contiguous()
            for k, v in self.state_dict().items()
            if not k.startswith("backbone.")
            and not (skip and k.startswith(skip))
            and v.data_ptr() not in trunk
        }

    def save(
        self,
        directory: Path,
        tokenizer: Any,
        task_tokenizers: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Write the trunk (save_pretrained), heads/adapters, tokenizers and bitblend.json."""
        directory.mkdir(parents=True, exist_ok=True)
        lm_task = self.lm_checkpoint_task
        if lm_task is not None:
            # Trunk + the checkpoint-class LM head as that class's checkpoint, so
            # AutoModelForCausalLM / AutoModelForMaskedLM load the fine-tuned LM itself.
            head = self.heads[lm_task]
            save_lm_pretrained(directory, self.backbone, head, self.specs[lm_task].lm_head)
        else:
            self.backbone.save_pretrained(directory)  # type: ignore[operator]
        tokenizer.save_pretrained(directory)
        for name, tok in (task_tokenizers or {}).items():
            tok.save_pretrained(directory / "tokenizers" / name)
        save_file(self.extra_state(), str(directory / HEADS_FILE))
        meta = {
            "format": 2,
            "pooling": self.pooling,
            "head_dropout": self.head_dropout,
            "heads": [asdict(s) for s in self.specs.values()],
            **(extra or {}),
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_model(directory: Path) -> tuple[MultiTaskModel, Any, dict[str, Any]]:
    """Reload a saved model directory: (model, tokenizer, bitblend.json + task tokenizers)."""
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise BitblendError(f"{directory}: not a bitblend model directory (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    specs = [HeadSpec(**h) for h in meta["heads"]]
    lm_task = next((s for s in specs if s.lm_head), None)
    lm_head: nn.Module | None = None
    if lm_task is not None:
        backbone, lm_head = load_lm_pretrained(directory, lm_task.lm_head)
    else:
        kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
        config = json.loads((directory / "config.json").read_text())
        if config.get("model_type") in ("bert", "roberta", "xlm-roberta", "electra"):
            kwargs["add_pooling_layer"] = False
        backbone = AutoModel.from_pretrained(directory, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = MultiTaskModel(backbone, specs, meta["pooling"], meta.get("head_dropout", 0.1))
    if lm_task is not None and lm_head is not None:
        model.heads[lm_task.task].load_state_dict(lm_head.state_dict())
    saved = load_file(str(directory / HEADS_FILE))
    if set(saved) != set(model.extra_state()):
        raise BitblendError(f"{directory / HEADS_FILE}: does not match {META_FILE}")
    model.load_state_dict(saved, strict=False)
    meta["task_tokenizers"] = {
        s.task: AutoTokenizer.from_pretrained(directory / "tokenizers" / s.task)
        for s in specs
        if (directory / "tokenizers" / s.task).is_dir()
    }
    return model, tokenizer, meta
