"""The shared transformer trunk with one head per task, and its save/load layout.

`model/` in a run directory is a transformers `save_pretrained` directory (so
`AutoModel.from_pretrained(run/model)` loads the trunk) plus `heads.safetensors`,
`bitblend.json` (tasks, label names, pooling) and the tokenizer files.
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
from bitblend.models.backbones import hidden_size, is_decoder

HEADS_FILE = "heads.safetensors"
META_FILE = "bitblend.json"


@dataclass
class HeadSpec:
    """What a task head predicts."""

    task: str
    head: str  # classification | regression
    num_outputs: int
    label_names: list[str] = field(default_factory=list)


class MultiTaskModel(nn.Module):
    """Backbone -> pooled vector (batch, hidden) -> per-task head logits (batch, outputs)."""

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
        width = hidden_size(backbone)
        self.heads = nn.ModuleDict(
            {
                s.task: nn.Sequential(nn.Dropout(head_dropout), nn.Linear(width, s.num_outputs))
                for s in specs
            }
        )
        self.head_dropout = head_dropout

    @property
    def fp32_module_names(self) -> list[str]:
        """Modules a low-precision recipe keeps in fp32: the task heads."""
        return [f"heads.{name}" for name in self.heads]

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(batch, seq, hidden) + (batch, seq) mask -> (batch, hidden)."""
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "last":
            # Right padding: the last real token sits at index (number of real tokens - 1).
            last = mask.sum(dim=1).clamp(min=1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

    def forward(
        self, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits of `task`'s head for a padded batch: (batch, num_outputs)."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        pooled = self.pool(out.last_hidden_state, attention_mask)
        return self.heads[task](pooled)

    # -- persistence -------------------------------------------------------------------
    def save(self, directory: Path, tokenizer: Any, extra: dict[str, Any] | None = None) -> None:
        """Write the trunk (save_pretrained), the heads, the tokenizer and bitblend.json."""
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(directory)  # type: ignore[operator]
        tokenizer.save_pretrained(directory)
        heads = {k: v.detach().contiguous() for k, v in self.heads.state_dict().items()}
        save_file(heads, str(directory / HEADS_FILE))
        meta = {
            "format": 1,
            "pooling": self.pooling,
            "head_dropout": self.head_dropout,
            "heads": [asdict(s) for s in self.specs.values()],
            **(extra or {}),
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_model(directory: Path) -> tuple[MultiTaskModel, Any, dict[str, Any]]:
    """Reload a saved model directory: (model in fp32, tokenizer, bitblend.json contents)."""
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise BitblendError(f"{directory}: not a bitblend model directory (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
    config = json.loads((directory / "config.json").read_text())
    if config.get("model_type") in ("bert", "roberta", "xlm-roberta", "electra"):
        kwargs["add_pooling_layer"] = False
    backbone = AutoModel.from_pretrained(directory, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    specs = [HeadSpec(**h) for h in meta["heads"]]
    model = MultiTaskModel(backbone, specs, meta["pooling"], meta.get("head_dropout", 0.1))
    model.heads.load_state_dict(load_file(str(directory / HEADS_FILE)))
    return model, tokenizer, meta
