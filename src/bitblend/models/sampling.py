"""Sampling text from a causal_lm head: greedy at temperature 0, else temperature-scaled
nucleus (top-p) sampling drawn from one seeded generator, so the same seed gives the same
text. Used by `bitblend generate` (runs/generate.py) and by the samples a finished
causal-LM run writes for its report (train/samples.py).

Each new token reruns the whole context (no KV cache): simple and exact for the model
sizes bitblend trains on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bitblend.errors import BitblendError


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


def position_limit(model: Any) -> int:
    """The backbone's positions (0: unknown); the context is cut to the last this many."""
    config = model.backbone.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0)
    return int(limit or 0)


@torch.no_grad()
def sample_ids(
    model: Any, task: str, ids: list[int], sampling: Sampling, eos_id: int | None
) -> list[int]:
    """New token ids after the prompt `ids` from `model`'s causal_lm head `task` (a
    MultiTaskModel in eval mode), stopping at `eos_id` or `max_new_tokens`."""
    limit = position_limit(model)
    gen = torch.Generator().manual_seed(sampling.seed)
    new: list[int] = []
    for _ in range(sampling.max_new_tokens):
        context = (ids + new)[-limit:] if limit else ids + new
        x = torch.tensor([context])
        logits = model(task, input_ids=x, attention_mask=torch.ones_like(x))[0, -1]
        token = next_token(logits, sampling, gen)
        if token == eos_id:
            break
        new.append(token)
    return new
