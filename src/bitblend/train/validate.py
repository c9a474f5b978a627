"""`bitblend validate`: every check `train` makes before its first step, in seconds.

It runs the trainer's own setup code (train/setup.py) up to, not including, the optimizer
and the first step: the data files are read and checked row by row (columns, labels, eval
labels the training data lacks), the backbone and its tokenizer load, own-vocabulary
tokenizers train, every split is tokenised, batch sizes and position embeddings are checked
against the data, the precision recipe is built for this device and the mixture for the
tasks. The first failure raises train's one-line BitblendError; nothing is written.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from bitblend.config.schema import Recipe
from bitblend.data.epochs import steps_for_epochs
from bitblend.data.mixture import Mixture
from bitblend.device import pick_device
from bitblend.estimate.shapes import recipe_shapes
from bitblend.precision.recipes import build_precision
from bitblend.taskspec import load_data
from bitblend.train.setup import build_model, build_tasks


@dataclass
class Validation:
    """What a passing validation found: one line per task and the seconds each stage took."""

    tasks: list[str] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)


def validate_recipe(recipe: Recipe) -> Validation:
    """Run train's setup checks on `recipe`; raise its first one-line error."""
    out = Validation()
    clock = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        out.stages[name] = now - clock
        clock = now

    device = pick_device(recipe.train.device)
    precision = build_precision(recipe.precision, device, recipe.train.seed)
    stage("precision")
    datas = load_data(recipe)
    stage("data")
    # Backbone config + tokenizer, heads, batch sizes and the position-embedding limit,
    # as `bitblend estimate` checks them (no weights needed for that part).
    recipe_shapes(recipe, datas)
    stage("shapes")
    model, tokenizer, task_tokenizers = build_model(recipe, datas)
    stage("backbone")
    # Tokenise every split on the CPU as train does; the context is unused until a batch runs.
    context = getattr(precision, "forward_context", contextlib.nullcontext)
    tasks = build_tasks(recipe, datas, model, tokenizer, task_tokenizers, context, device)
    stage("tokenize")
    sizes = [len(t.train) for t in tasks]
    steps = steps_for_epochs(recipe, sizes) if recipe.train.epochs else recipe.train.steps
    if recipe.train.epochs:
        out.tasks.append(f"train.epochs {recipe.train.epochs:g} -> {steps} steps")
    Mixture(recipe.mixing, [t.name for t in tasks], sizes, recipe.train.seed, steps)
    stage("mixture")
    for t in tasks:
        labels = f", {len(t.data.label_names)} labels" if t.data.label_names else ""
        longest = int(max(t.train.lengths, default=0))
        tok = " (own WordPiece)" if t.name in task_tokenizers else ""
        if t.data.stream is not None:  # read lazily: its size is an estimate, lengths unknown
            n = len(t.data.stream.shards)
            out.tasks.append(
                f"{t.name} ({t.cfg.head}): streamed, ~{len(t.train)} train rows in {n} "
                f"shard(s) / {len(t.eval)} eval examples{tok}"
            )
            continue
        out.tasks.append(
            f"{t.name} ({t.cfg.head}): {len(t.train)} train / {len(t.eval)} eval examples"
            f"{labels}, longest {longest} tokens{tok}"
        )
    return out
