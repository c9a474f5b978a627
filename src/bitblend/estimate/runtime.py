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

Having encoded every split, the child also reports each task's token lengths (histograms,
and the training split's lengths in order for dealing a run's own batches;
estimate/lengths.py): the time model prices steps at the lengths the data has, not at
max_length; and, after its peak, what the end of a run maps outside the heap (its
baselines' and report's imports and plots, estimate/wholerun.py).

    python -m bitblend.estimate.runtime RECIPE.yaml [--ranks N]
    # prints {"peak_rss": bytes,
    #         "lengths": [per task: {"train": [[L, n], ...], "eval": ..., "order": [L, ...]}],
    #         "end_of_run": bytes}
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitblend.config.load import dump_recipe
from bitblend.config.schema import Recipe
from bitblend.errors import BitblendError
from bitblend.estimate.lengths import TaskLengths, histogram, split_lengths, split_order
from bitblend.estimate.wholerun import end_of_run_bytes
from bitblend.procmem import peak_rss_bytes

ENV = "BITBLEND_ESTIMATE_RUNTIME"  # "self": take the estimate's own RSS (tests, quick looks)
TRAIN_MODULES = ("bitblend.train.trainer", "bitblend.train.setup", "bitblend.report.html")


@dataclass
class Runtime:
    """What the runtime child measured: its peak RSS, each task's token lengths (None:
    unknown, priced at the worst case) and the end of a run's pages outside the heap
    (estimate/wholerun.py)."""

    bytes: int
    lengths: list[TaskLengths | None] = field(default_factory=list)
    end: int = 0


def measure_runtime(recipe: Recipe, ranks: int = 1, timeout: float = 900.0) -> Runtime:
    """Peak RSS of a child that imports, loads and tokenises as `train` does (bytes), and
    the token lengths of what it encoded."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(dump_recipe(recipe), encoding="utf-8")
        cmd = [sys.executable, "-m", "bitblend.estimate.runtime", str(path), "--ranks", str(ranks)]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BitblendError(f"estimate: measuring the runtime failed ({tail})")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    lengths = [None if t is None else TaskLengths.from_json(t) for t in out["lengths"]]
    return Runtime(int(out["peak_rss"]), lengths, int(out.get("end_of_run", 0)))


def run_tokenizer(recipe: Recipe, datas: list[Any]) -> Any:
    """The backbone's tokenizer as `train` makes it. A llama alias's BPE is trained on the
    recipe's training text, as train does before encoding: the meta-device config's
    untrained byte tokenizer would encode every text byte by byte (the runtime read 960
    MiB for llama-15m on BBC News with it, 639 with the trained BPE)."""
    from bitblend.estimate.shapes import backbone_config
    from bitblend.models.llama import is_llama_alias, llama_tokenizer, tokenizer_corpus

    m = recipe.model
    if is_llama_alias(m.backbone):
        texts = [d.train.text for d in datas if d.train.text is not None]
        return llama_tokenizer(lambda: tokenizer_corpus(texts), m.vocab_size)
    return backbone_config(m.backbone, m.dropout, m.attention_dropout, m.vocab_size)[1]


def encoded_lengths(recipe: Recipe, datas: list[Any]) -> list[TaskLengths | None]:
    """Every split of every task encoded as `train` encodes it (its tokenizer, own
    WordPiece vocabularies trained, packing), one task at a time; their token lengths.
    A streamed task's (its train table is only a sample of the stream) are None."""
    from bitblend.data.wordpiece import train_wordpiece
    from bitblend.taskspec import encode_task, head_spec

    tokenizer = run_tokenizer(recipe, datas)
    cap = recipe.train.eval_max_examples  # evaluation reads the first `cap` examples
    out: list[TaskLengths | None] = []
    # `train` holds every task's encoded splits for the whole run, so they are all alive
    # when its model is built: keep them until the child reads its peak (freeing each
    # task's before the next read the four-task mixture's runtime 32 MiB below the RSS
    # `train` held before its first step, beyond the model's own build)
    held: list[Any] = []
    for i, (task, data) in enumerate(zip(recipe.tasks, datas, strict=True)):
        tok = tokenizer
        own = task.tokenizer == "wordpiece" and data.train.text is not None
        if own:
            tok = train_wordpiece([str(t) for t in data.train.text or []], task.wordpiece_vocab)
        uses_text = data.train.text is not None
        spec = head_spec(task, data, tok if uses_text else None, own, i)
        train = encode_task(task, spec, data.train, data.train_targets, tok, recipe)
        ev = encode_task(task, spec, data.eval, data.eval_targets, tok, recipe)
        streamed = getattr(data, "stream", None) is not None
        order = split_order(train)  # its histogram is the train split's lengths
        lengths = TaskLengths(histogram(order), split_lengths(ev, cap), order)
        out.append(None if streamed else lengths)
        held.append((train, ev))
    return out


def _child(recipe_path: str, ranks: int) -> dict[str, Any]:
    """In the child: train's imports, data and tokenisation; returns peak RSS in bytes and
    the token lengths of every task."""
    import logging
    import warnings

    from bitblend.config.load import load_recipe
    from bitblend.taskspec import load_data

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
    lengths = encoded_lengths(recipe, load_data(recipe))
    peak = peak_rss_bytes()  # not ru_maxrss: that can be the parent's (procmem.py)
    return {
        "peak_rss": peak,
        "lengths": [t and t.to_json() for t in lengths],
        # after the peak: the baselines' and the report's imports and plots (every run
        # writes report.html), pages outside the heap that land on top of a run's peak
        "end_of_run": end_of_run_bytes(),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--ranks", type=int, default=1)
    a = ap.parse_args()
    print(json.dumps(_child(a.recipe, a.ranks)))
