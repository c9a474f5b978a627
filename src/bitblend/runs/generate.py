"""`bitblend generate`: sample text from a finished run's causal_lm head, so a user can see
what the model learnt.

Greedy at temperature 0, else temperature-scaled nucleus (top-p) sampling drawn from one
seeded generator: the same seed gives the same text. Each new token reruns the whole
context (no KV cache): simple and exact for the model sizes bitblend trains on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitblend.errors import BitblendError
from bitblend.models.adapters import load_adapter
from bitblend.models.trunk import MultiTaskModel, load_model


@dataclass(kw_only=True)
class Sampling:
    """How to pick each next token."""

    max_new_tokens: int = 64
    temperature: float = 0.8  # 0 = greedy
    top_p: float = 0.95  # keep the smallest set of tokens whose probability reaches this
    seed: int = 0

    def check(self) -> None:
        """One-line errors for values that cannot sample."""
        if self.max_new_tokens < 1:
            raise BitblendError(f"--max-new-tokens: {self.max_new_tokens}; expected >= 1")
        if self.temperature < 0:
            raise BitblendError(f"--temperature: {self.temperature}; expected >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise BitblendError(f"--top-p: {self.top_p}; expected a value in (0, 1]")


def next_token(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator) -> int:
    """One token id from (vocab,) logits."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    # Keep a token while the mass before it is below top_p (the first always stays).
    keep = (sorted_p.cumsum(0) - sorted_p) < sampling.top_p
    sorted_p = sorted_p * keep
    pick = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
    return int(order[pick])


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
    config = model.backbone.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    if not ids:  # an empty prompt starts from the document separator
        ids = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
    gen = torch.Generator().manual_seed(sampling.seed)
    new: list[int] = []
    for _ in range(sampling.max_new_tokens):
        context = (ids + new)[-limit:] if limit else ids + new
        x = torch.tensor([context])
        logits = model(name, input_ids=x, attention_mask=torch.ones_like(x))[0, -1]
        token = next_token(logits, sampling, gen)
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    return tokenizer.decode(new), new
