"""What `bitblend train --resume RUN --set KEY=VALUE` may change, and nothing more.

A checkpoint holds state whose meaning the recipe fixes: weights of one model, optimizer
moments of one optimizer, sampler positions over one tokenised data set, a mixture and an
LR schedule planned over `train.steps`. Changing any of those behind the state would make
the run something its record does not say, so only keys that steer the loop without
touching that state may change on resume. `train.steps` is one of them: it moves where the
run stops; the LR schedule and the mixture keep the horizon they were planned with (the
trainer keeps it in the checkpoint), so the learning rate continues without a jump.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from bitblend.config.load import apply_overrides, read_yaml, recipe_from_dict, recipe_to_dict
from bitblend.config.schema import Recipe
from bitblend.errors import BitblendError

# Keys `--set` may change on resume: where the run stops, how often it logs, evaluates and
# checkpoints, how much it evaluates, CPU threads/heap, and how many processes share the
# work (distributed.*: checkpoints reshard across world sizes and strategies, DCP for
# fsdp2). None of them is in the saved state.
RESUMABLE = (
    "description",
    "distributed.strategy",
    "distributed.timeout_s",
    "distributed.find_unused_parameters",
    "train.steps",
    "train.eval_every",
    "train.eval_batch_size",
    "train.eval_max_examples",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.threads",
    "train.cpu_heap",
    "train.baselines",
)


def changed_keys(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Dotted paths (`train.steps`, `tasks.0.weight`) where two resolved recipes differ."""
    if isinstance(before, dict) and isinstance(after, dict):
        out: list[str] = []
        for key in sorted(set(before) | set(after), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            out += changed_keys(before.get(key), after.get(key), path)
        return out
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        out = []
        for i, (a, b) in enumerate(zip(before, after, strict=True)):
            out += changed_keys(a, b, f"{prefix}.{i}")
        return out
    return [] if before == after else [prefix]


def resume_recipe(run_dir: Path, overrides: list[str]) -> tuple[Recipe, dict[str, list[Any]]]:
    """The run's recipe with `overrides` applied, and {key: [old, new]} for what changed.

    Raises one line naming every key that cannot change on resume; nothing is written.
    """
    path = run_dir / "recipe.yaml"
    data = read_yaml(path)
    before = recipe_to_dict(recipe_from_dict(copy.deepcopy(data), str(path)))
    recipe = recipe_from_dict(apply_overrides(data, overrides), str(path))
    after = recipe_to_dict(recipe)
    keys = changed_keys(before, after)
    refused = [k for k in keys if k not in RESUMABLE]
    if refused:
        raise BitblendError(
            f"--resume {run_dir}: --set cannot change {', '.join(refused)} on resume (the "
            f"checkpoint's state depends on it); changeable: {', '.join(RESUMABLE)}; start a "
            "new run to change more"
        )
    return recipe, {k: [_get(before, k), _get(after, k)] for k in keys}


def _get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[int(part)] if isinstance(data, list) else data.get(part)
    return data
