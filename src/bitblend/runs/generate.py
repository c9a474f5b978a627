"""`bitblend generate`: sample text from a finished run's causal_lm head, so a user can see
what the model learnt (the sampling itself: models/sampling.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bitblend.errors import BitblendError
from bitblend.models.adapters import load_adapter
from bitblend.models.sampling import Sampling, next_token, sample_ids
from bitblend.models.trunk import MultiTaskModel, load_model

__all__ = ["Sampling", "generate", "next_token"]


def _lm_task(model: MultiTaskModel, run_dir: Path, task: str | None) -> str:
    names = [n for n, s in model.specs.items() if s.head == "causal_lm"]
    if task is not None:
        if task not in names:
            raise BitblendError(
                f"--task {task}: not a causal_lm task of {run_dir} (expected one of "
                f"{', '.join(names) or 'none'})"
            )
        return task
    if not names:
        raise BitblendError(f"{run_dir}: has no causal_lm task to generate text with")
    return names[0]


def load_lm(run_dir: Path) -> tuple[MultiTaskModel, Any]:
    """(model in fp32 eval mode, tokenizer) of a finished run, its LoRA adapter included."""
    model_dir = run_dir / "model"
    if not model_dir.is_dir():
        raise BitblendError(f"{run_dir}: no model/ directory (is it a finished run?)")
    model, tokenizer, meta = load_model(model_dir)
    load_adapter(model, model_dir, meta)  # a LoRA run: its adapter on the saved base
    # fp32 whatever the run trained in: a bf16-true run saves a bf16 trunk beside fp32
    # heads, and sampling a few tokens on a CPU gains nothing from low precision.
    model.float().eval()
    return model, tokenizer


@torch.no_grad()
def generate(
    run_dir: Path, prompt: str, sampling: Sampling, task: str | None = None
) -> tuple[str, list[int]]:
    """(generated text after the prompt, its token ids) from the run's model/."""
    sampling.check()
    model, tokenizer = load_lm(run_dir)
    name = _lm_task(model, run_dir, task)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    if not ids:  # an empty prompt starts from the document separator
        ids = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
    new = sample_ids(model, name, list(ids), sampling, tokenizer.eos_token_id)
    return tokenizer.decode(new), new
