"""A finished causal-LM run's generated samples (samples.json, shown in report.html): per
causal_lm task, greedy text continuing the start of its first eval document, from the saved
model/ exactly as `bitblend generate RUN_DIR --prompt PROMPT --temperature 0` makes it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from bitblend.models.adapters import load_adapter
from bitblend.models.sampling import Sampling, sample_ids
from bitblend.models.trunk import load_model
from bitblend.train.run_dir import write_json

SAMPLES_FILE = "samples.json"
PROMPT_TOKENS = 8  # the prompt: this many tokens from the start of the first eval document
SAMPLING = Sampling(max_new_tokens=32, temperature=0.0, seed=0)  # greedy, short


def _prompt(tokenizer: Any, split: Any) -> str:
    """The first PROMPT_TOKENS tokens of the split's first document, as text."""
    if not split.ids:
        return ""
    row = list(split.ids[0])
    if split.segments is not None:  # packed: the first document of the row
        row = [t for t, s in zip(row, split.segments[0], strict=True) if s == split.segments[0][0]]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    words = [t for t in row if t not in special][:PROMPT_TOKENS]
    return str(tokenizer.decode(words)).strip()


def write_samples(run_dir: Path, tasks: list[Any], step: int) -> Path | None:
    """samples.json for the run's causal_lm tasks (`tasks`: the trainer's TaskRuntime
    objects); None when it has none."""
    lm = [t for t in tasks if t.cfg.head == "causal_lm"]
    if not lm:
        return None
    model, tokenizer, meta = load_model(run_dir / "model")
    load_adapter(model, run_dir / "model", meta)  # a LoRA run samples through its adapter
    model.float().eval()  # as `bitblend generate` does: fp32, whatever the run trained in
    out = []
    for t in lm:
        prompt = _prompt(t.tokenizer, t.eval)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        if not ids:
            ids = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
        new = sample_ids(model, t.cfg.name, list(ids), SAMPLING, tokenizer.eos_token_id)
        out.append({"task": t.cfg.name, "prompt": prompt, "text": tokenizer.decode(new)})
    path = run_dir / SAMPLES_FILE
    write_json(path, {"step": step, "sampling": dataclasses.asdict(SAMPLING), "samples": out})
    return path
