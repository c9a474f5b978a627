"""A finished transformer run (recipe.yaml + model/), ready for inference in a serving
precision."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitblend.config.schema import Recipe, TaskConfig
from bitblend.data.modalities import EncodedSplit
from bitblend.data.sources import load_task_data
from bitblend.data.table import Table
from bitblend.device import pick_device
from bitblend.models.adapters import load_adapter
from bitblend.models.trunk import MultiTaskModel, load_model
from bitblend.precision.base import Precision
from bitblend.precision.recipes import build_precision
from bitblend.runs.base import find_task
from bitblend.runs.serving import check_serving, inference_config, quantize_int8
from bitblend.taskspec import encode_task
from bitblend.train.evaluate import BatchSpec, predict_outputs


@dataclass
class TransformerRun:
    """A finished run's recipe and model, converted to a serving precision."""

    run_dir: Path
    recipe: Recipe
    model: MultiTaskModel
    tokenizer: Any
    task_tokenizers: dict[str, Any]
    precision: Precision
    device: torch.device
    serving: str = "run"  # the serving precision's name (runs/serving.py)

    @property
    def tasks(self) -> list[TaskConfig]:
        """The recipe's tasks."""
        return self.recipe.tasks

    def task(self, name: str | None) -> tuple[int, TaskConfig]:
        """The task called `name`, or the only task when `name` is None."""
        return find_task(self.recipe.tasks, name)

    def head(self, task: str) -> str:
        """The head of `task`."""
        return self.model.specs[task].head

    def label_names(self, task: str) -> list[str]:
        """Class names of `task` in output order."""
        return list(self.model.specs[task].label_names)

    def outputs(self, task: str, table: Table) -> np.ndarray:
        """Logits (n, outputs) of a pooled head on a table, in the table's order."""
        _, cfg = self.task(task)
        split = self.encode(cfg, table, np.zeros(len(table), dtype=np.float32))
        out, _ = predict_outputs(self.model, task, split, self.batch_spec(cfg))
        return out

    def eval_split(self, task: str) -> tuple[Table, np.ndarray]:
        """The recipe's held-out table of `task` and its targets."""
        i, cfg = self.task(task)
        td = load_task_data(cfg, i, self.recipe.train.seed)
        return td.eval, td.eval_targets

    def encode(self, task: TaskConfig, table: Any, targets: Any) -> EncodedSplit:
        """Encode a table exactly as training did (tokenizer, patches, feature statistics)."""
        tok = self.task_tokenizers.get(task.name, self.tokenizer)
        return encode_task(task, self.model.specs[task.name], table, targets, tok, self.recipe)

    def batch_spec(self, task: TaskConfig) -> BatchSpec:
        """Batching for inference with the run's precision."""
        tok = self.task_tokenizers.get(task.name, self.tokenizer)
        return BatchSpec(
            context=self.precision.forward_context,
            device=self.device,
            batch_size=self.recipe.train.eval_batch_size,
            pad_id=int(getattr(tok, "pad_token_id", 0) or 0),
            multiple=self.recipe.train.pad_to_multiple_of,
            mask_token=getattr(tok, "mask_token_id", None),
            vocab_size=len(tok),
        )


def serve_model(
    model: MultiTaskModel, recipe: Recipe, serving: str = "run"
) -> tuple[Precision, torch.device]:
    """Convert a loaded (or merged) model in place to a serving precision of `recipe`'s run.

    The weights come back to fp32 first: model/ holds them in the training dtype (bf16 for
    a bf16-true run), and every precision recipe converts from the fp32 model training
    starts from. Without this, fp32 or int8 serving of a bf16-true run kept bf16 weights
    under an fp32 forward (a dtype-mismatch error in the first matmul).
    """
    check_serving(serving)
    device = pick_device(recipe.train.device)
    model.float()
    precision = build_precision(inference_config(recipe.precision, serving), device)
    precision.convert_module(model)
    if serving == "int8":
        quantize_int8(model)
    model.eval()
    return precision, device


def load_transformer(run_dir: Path, recipe: Recipe, serving: str = "run") -> TransformerRun:
    """Reload a transformer run directory's final model in a serving precision."""
    check_serving(serving)  # before the (slow) model load
    model, tokenizer, meta = load_model(run_dir / "model")
    load_adapter(model, run_dir / "model", meta)  # LoRA runs: model/adapter/ on the base
    precision, device = serve_model(model, recipe, serving)
    return TransformerRun(
        run_dir, recipe, model, tokenizer, meta["task_tokenizers"], precision, device, serving
    )
