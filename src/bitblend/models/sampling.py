"""Sampling text from a causal_lm head: greedy at temperature 0, else temperature-scaled
nucleus (top-p) sampling drawn from one seeded generator, so the same seed gives the same
text. Used by `bitblend generate` (runs/generate.py) and by the samples a finished
causal-LM run writes for its report (train/samples.py).

Decoding keeps the backbone's KV cache (transformers' past_key_values), so each new token
runs one position through the model instead of the whole context.
"""

from __future__ import annotations

import inspect
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


def _cache_arg(backbone: Any) -> str:
    """The cache's keyword: `cache` in recent transformers (5.2x deprecates the older
    `past_key_values`, which earlier releases alone take)."""
    params = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def sample_ids(
    model: Any,
    task: str,
    ids: list[int],
    sampling: Sampling,
    eos_id: int | None,
    cache: bool = True,
) -> list[int]:
    """New token ids after the prompt `ids` from `model`'s causal_lm head `task` (a
    MultiTaskModel in eval mode), stopping at `eos_id` or `max_new_tokens`.

    With `cache`, the backbone keeps its keys and values (transformers' past_key_values)
    and each step runs only the newest token; without, every step reruns the whole
    context. Both give the same tokens. Once the context outgrows the backbone's
    positions it is cut to the last `limit` tokens, whose positions all shift: from then
    on every step reruns the cut context, cache or not.
    """
    limit = position_limit(model)
    gen = torch.Generator().manual_seed(sampling.seed)
    # Only a plain text trunk can reuse its cache (inputs_embeds tasks mix modalities).
    cache = cache and not model.specs[task].uses_embeds
    past: Any = None  # the backbone's cache over `context[:-1]`, or None
    new: list[int] = []
    for _ in range(sampling.max_new_tokens):
        context = ids + new
        if limit and len(context) > limit:
            context, past = context[-limit:], None
        if cache:
            x = torch.tensor([context if past is None else context[-1:]])
            mask = torch.ones(1, len(context), dtype=torch.long)  # (1, cached + new)
            out = model.backbone(input_ids=x, attention_mask=mask, use_cache=True,
                                 **{_cache_arg(model.backbone): past})  # fmt: skip
            past = out.get("cache", None)
            if past is None:  # transformers before `cache`
                past = out.get("past_key_values", None)
            logits = model.heads[task](out.last_hidden_state[:, -1:])[0, -1]
        else:
            x = torch.tensor([context])
            logits = model(task, input_ids=x, attention_mask=torch.ones_like(x))[0, -1]
        token = next_token(logits, sampling, gen)
        if token == eos_id:
            break
        new.append(token)
    return new
