"""Preparing a run directory at the start of `fit`: a new run records its recipe and
labels; a resumed one loads its latest checkpoint, trims metrics.jsonl back to it and
records what the resume changed."""

from __future__ import annotations

from typing import Any

from bitblend.errors import BitblendError
from bitblend.models.llama import save_trained_tokenizer
from bitblend.report.sinks import truncate_jsonl
from bitblend.train.recipe_log import record_recipe
from bitblend.train.run_dir import write_json


def prepare_run_dir(trainer: Any) -> None:
    """Create the run directory, or restore the latest checkpoint and record the resume
    (trainer: train/trainer.py's Trainer; rank 0 alone writes)."""
    if trainer.dist.main:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        save_trained_tokenizer(trainer.tokenizer, trainer.run_dir)  # llama-<size>: once per run
    if trainer.resume:
        step = trainer.restore_latest()
        steps = trainer.recipe.train.steps
        if steps < step:
            raise BitblendError(
                f"--set train.steps={steps}: below step {step} of the checkpoint resumed"
            )
        # The final eval rows of a finished run stay when its checkpoint holds them
        # (reused, not redone); a legacy final checkpoint without them evaluates again.
        redo_eval = (
            trainer.restored is not None
            and trainer.restored.final_eval is None
            and step >= trainer.recipe.train.steps
        )
        if trainer.dist.main:
            truncate_jsonl(trainer.run_dir / "metrics.jsonl", step,
                           keep_eval_at_last=not redo_eval, notice=trainer._notice)  # fmt: skip
            record_recipe(trainer.run_dir, trainer.recipe, event="resume", step=step,
                          overrides=trainer.overrides, changed=trainer.changed,
                          plan_steps=trainer.plan_steps)  # fmt: skip
        if trainer.restored is None:
            trainer._notice(f"{trainer.run_dir}: no checkpoint yet; starting again from step 0")
            if trainer.dist.main:
                write_labels(trainer)
        else:
            trainer.console.print(f"resumed {trainer.run_dir} at step {step}")
        if steps > trainer.plan_steps:
            trainer.console.print(
                f"train.steps {steps} is past the planned horizon of {trainer.plan_steps} "
                f"steps: the learning rate stays at its end value after step "
                f"{trainer.plan_steps} (docs/usage.md, resuming)"
            )
    elif trainer.dist.main:
        record_recipe(trainer.run_dir, trainer.recipe, event="start", step=0,
                      overrides=trainer.overrides)  # fmt: skip
        write_labels(trainer)


def write_labels(trainer: Any) -> None:
    """labels.json: each task's label names."""
    labels = {t.name: t.data.label_names for t in trainer.tasks if t.data.label_names}
    write_json(trainer.run_dir / "labels.json", labels)
