"""The resident runtime of a training process: what it holds before its model's first
tensor, measured rather than guessed.

A `train` process imports more than `estimate` does (the trainer, its sinks, the report;
peft for LoRA, torch.distributed for ranks), and it tokenises every split of every task
before it builds the model: the tokenizer's encodings of a large eval split are a
high-water mark that glibc keeps. The estimate's own RSS sees none of that (it read 405
MiB where a MiniLM run's setup held 600-700 here). So a fresh child process does what
`train` does up to the model - the same imports, the recipe's data, its own-vocabulary
tokenizers trained, every split encoded - and reports its peak RSS. The child stands in
for train's process, so it runs train's own setup functions by module name; this package
never imports train/ (the layer contract).

    python -m bitblend.estimate.runtime RECIPE.yaml [--ranks N]   # prints the bytes
"""

from __future__ import annotations

import argparse
import importlib
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bitblend.config.load import dump_recipe
from bitblend.config.schema import Recipe
from bitblend.errors import BitblendError

ENV = "BITBLEND_ESTIMATE_RUNTIME"  # "self": take the estimate's own RSS (tests, quick looks)
TRAIN_MODULES = ("bitblend.train.trainer", "bitblend.train.setup", "bitblend.report.html")


def measure_runtime(recipe: Recipe, ranks: int = 1, timeout: float = 900.0) -> int:
    """Peak RSS of a child that imports, loads and tokenises as `train` does (bytes)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(dump_recipe(recipe), encoding="utf-8")
        cmd = [sys.executable, "-m", "bitblend.estimate.runtime", str(path), "--ranks", str(ranks)]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BitblendError(f"estimate: measuring the runtime failed ({tail})")
    return int(proc.stdout.strip().splitlines()[-1])


def _child(recipe_path: str, ranks: int) -> int:
    """In the child: train's imports, data and tokenisation; returns peak RSS in bytes."""
    import logging
    import warnings

    from bitblend.config.load import load_recipe
    from bitblend.data.wordpiece import train_wordpiece
    from bitblend.estimate.shapes import backbone_config
    from bitblend.taskspec import head_spec, load_data

    warnings.simplefilter("ignore")  # the parent reads stdout's last line only
    logging.disable(logging.WARNING)
    recipe = load_recipe(recipe_path)
    for name in TRAIN_MODULES:
        importlib.import_module(name)
    if recipe.model.adapter.kind != "none":
        importlib.import_module("peft")
    if ranks > 1:
        importlib.import_module("torch.distributed.fsdp")
        importlib.import_module("torch.nn.parallel")
    encode_task = importlib.import_module("bitblend.train.setup").encode_task
    m = recipe.model
    _, tokenizer = backbone_config(m.backbone, m.dropout, m.attention_dropout)
    datas = load_data(recipe)
    tokenizer = _llama_bpe(recipe, datas) or tokenizer
    for i, (task, data) in enumerate(zip(recipe.tasks, datas, strict=True)):
        tok = tokenizer
        own = task.tokenizer == "wordpiece" and data.train.text is not None
        if own:
            tok = train_wordpiece([str(t) for t in data.train.text or []], task.wordpiece_vocab)
        uses_text = data.train.text is not None
        spec = head_spec(task, data, tok if uses_text else None, own, i)
        encode_task(task, spec, data.train, data.train_targets, tok, recipe)
        encode_task(task, spec, data.eval, data.eval_targets, tok, recipe)
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _llama_bpe(recipe: Recipe, datas: list[Any]) -> Any:
    """llama-<size>: the byte-level BPE train trains on the recipe's mixture before the
    model (models/llama.py), whose high-water and encodings belong to the runtime; None for
    other backbones."""
    from bitblend.models.llama import is_llama_alias, llama_tokenizer, tokenizer_corpus

    if not is_llama_alias(recipe.model.backbone):
        return None
    texts = [d.train.text for d in datas if d.train.text is not None]
    return llama_tokenizer(lambda: tokenizer_corpus(texts), recipe.model.vocab_size)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--ranks", type=int, default=1)
    a = ap.parse_args()
    print(_child(a.recipe, a.ranks))
