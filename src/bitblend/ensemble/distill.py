"""`bitblend distill`: train a student recipe on a teacher's softened outputs and hard labels.

The teacher (a run of any kind, or an ensemble spec) predicts every training example of
each student task it covers once, up front; the student then trains with the ordinary
Trainer (any backbone, any precision recipe), and each step's loss for a covered task is

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

(Hinton et al. 2015; a binary head uses the Bernoulli KL). The term enters through
`TaskRuntime.distill_loss`, the one hook train/step.py calls. A multi-task student distils
task by task: each task takes the teacher's task of the same name (or the teacher's only
task when both have one); tasks the teacher lacks train on hard labels alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bitblend.config.classic import CLASSIC, is_classic
from bitblend.config.schema import Recipe
from bitblend.errors import BitblendError
from bitblend.runs.load import load_run
from bitblend.tasks import calibration as cal
from bitblend.train.evaluate import predict_outputs
from bitblend.train.run_dir import write_json
from bitblend.train.trainer import Trainer

HEADS = ("classification", "binary")
INFO_FILE = "distill.json"


@dataclass
class KDLoss:
    """The distillation hook of one task: soft targets of every training example."""

    soft: torch.Tensor  # (n_train, C) teacher probabilities at temperature T; (n_train,) binary
    head: str
    temperature: float
    alpha: float
    history: list[float] = field(default_factory=list)  # KD term per micro-batch (diagnostic)

    def kd(self, logits: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        """T^2 * KL(teacher_T || student_T), mean over the batch."""
        t = self.temperature
        q = self.soft[torch.as_tensor(idx, dtype=torch.long)].to(logits.device)
        if self.head == "binary":
            z = logits.float().squeeze(-1) / t
            entropy = -(torch.xlogy(q, q) + torch.xlogy(1 - q, 1 - q))
            kl = F.binary_cross_entropy_with_logits(z, q, reduction="none") - entropy
            return kl.mean() * t * t
        log_s = F.log_softmax(logits.float() / t, dim=-1)
        return (torch.xlogy(q, q) - q * log_s).sum(dim=-1).mean() * t * t

    def __call__(self, logits: torch.Tensor, hard: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        """alpha * KD + (1 - alpha) * the hard-label loss."""
        kd = self.kd(logits, idx)
        self.history.append(float(kd.detach()))
        return self.alpha * kd + (1.0 - self.alpha) * hard

    def state_dict(self) -> dict[str, Any]:
        """The settings and the KD history (the soft targets are recomputed from the teacher)."""
        return {"temperature": self.temperature, "alpha": self.alpha, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.temperature, self.alpha = float(state["temperature"]), float(state["alpha"])
        self.history = [float(x) for x in state["history"]]


@dataclass
class Covered:
    """A student task the teacher covers, with the teacher's eval-split predictions."""

    task: str
    teacher_task: str
    hook: KDLoss
    teacher_eval: np.ndarray  # (n_eval,) teacher's class ids on the student's eval split
    teacher_accuracy: float


def _pairs(teacher: Any, student_tasks: list[Any]) -> list[tuple[Any, str]]:
    """(student task runtime, teacher task name) for every covered task."""
    t_tasks = [t.name for t in teacher.tasks if teacher.head(t.name) in HEADS]
    s_tasks = [t for t in student_tasks if t.cfg.head in HEADS]
    if len(t_tasks) == 1 and len(s_tasks) == 1:
        return [(s_tasks[0], t_tasks[0])]
    return [(s, s.name) for s in s_tasks if s.name in t_tasks]


def attach_teacher(
    trainer: Any, teacher: Any, where: str, temperature: float, alpha: float
) -> list[Covered]:
    """Predict the teacher on each covered task's training and eval data; set the hooks."""
    pairs = _pairs(teacher, trainer.tasks)
    if not pairs:
        have = ", ".join(t.name for t in teacher.tasks)
        want = ", ".join(t.name for t in trainer.tasks)
        raise BitblendError(
            f"--teacher {where}: none of its tasks ({have}) matches a "
            f"classification/binary task of the student ({want})"
        )
    covered = []
    for task, t_name in pairs:
        head = teacher.head(t_name)
        names = list(task.data.label_names)
        t_names = teacher.label_names(t_name)
        if head != task.cfg.head or sorted(t_names) != sorted(names):
            raise BitblendError(
                f"--teacher {where}: task {t_name} ({head}, labels {t_names[:8]}) does not "
                f"match the student's {task.name} ({task.cfg.head}, labels {names[:8]})"
            )
        perm = [t_names.index(n) for n in names]  # teacher column of each student class
        train_p = cal.to_probs(head, teacher.outputs(t_name, task.data.train))[:, perm]
        eval_p = cal.to_probs(head, teacher.outputs(t_name, task.data.eval))[:, perm]
        soft = cal.scale(cal.log_probs(train_p), temperature)
        target = soft[:, 1] if head == "binary" else soft
        hook = KDLoss(torch.tensor(target, dtype=torch.float32), head, temperature, alpha)
        task.distill_loss = hook
        gold = np.asarray(task.data.eval_targets).astype(np.int64)
        acc = float((eval_p.argmax(axis=1) == gold).mean())
        covered.append(Covered(task.name, t_name, hook, eval_p.argmax(axis=1), acc))
    return covered


def agreement(trainer: Any, c: Covered) -> float:
    """Share of the eval split where the student's prediction equals the teacher's."""
    task = next(t for t in trainer.tasks if t.name == c.task)
    out, _ = predict_outputs(trainer.model, task.name, task.eval, task.batch)
    pred = (out[:, 0] > 0).astype(np.int64) if task.cfg.head == "binary" else out.argmax(axis=1)
    return float((pred == c.teacher_eval[: len(pred)]).mean())


def _window_mean(xs: list[float], first: bool) -> float | None:
    if not xs:
        return None
    k = max(1, len(xs) // 10)
    part = xs[:k] if first else xs[-k:]
    return float(np.mean(part))


def run_distill(
    teacher_dir: Path,
    recipe: Recipe,
    run_dir: Path,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    resume: bool = False,
    console: Any = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Distil `teacher_dir` into a student trained from `recipe`; returns the summary."""
    if temperature <= 0:
        raise BitblendError(f"--temperature {temperature}: expected a number > 0")
    if not 0.0 <= alpha <= 1.0:
        raise BitblendError(f"--alpha {alpha}: expected a number in [0, 1]")
    if is_classic(recipe):
        raise BitblendError(
            f"--student: model.backbone {CLASSIC} cannot learn from soft "
            "targets; choose a transformer backbone"
        )
    teacher = load_run(teacher_dir)
    trainer = Trainer(recipe, run_dir, resume=resume, console=console, show_progress=show_progress)
    covered = attach_teacher(trainer, teacher, str(teacher_dir), temperature, alpha)
    del teacher  # its predictions are all computed; free its models before training
    # At the student's initialisation; a resumed run's weights load later, inside fit().
    before = {c.task: None if resume else agreement(trainer, c) for c in covered}
    settings = {
        "teacher": str(teacher_dir.resolve()),
        "temperature": temperature,
        "alpha": alpha,
        "tasks": {c.task: c.teacher_task for c in covered},
    }
    if not resume:
        # Written before training, so `bitblend train --resume` can refuse this run and
        # `bitblend distill --resume` knows the teacher.
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / INFO_FILE, {**settings, "status": "training"})
    summary = trainer.fit()
    tasks = {}
    for c in covered:
        tasks[c.task] = {
            "teacher_task": c.teacher_task,
            "teacher_accuracy": c.teacher_accuracy,
            "student_accuracy": summary["eval"].get(c.task, {}).get("accuracy"),
            "agreement_before": before[c.task],
            "agreement_after": agreement(trainer, c),
            "kd_loss_first": _window_mean(c.hook.history, True),
            "kd_loss_last": _window_mean(c.hook.history, False),
        }
    info = {
        **settings,
        "status": "done",
        "hard_label_only": [t.name for t in trainer.tasks if t.name not in tasks],
        "per_task": tasks,
    }
    write_json(run_dir / INFO_FILE, info)
    summary["distill"] = info
    write_json(run_dir / "summary.json", summary)
    if console is not None:
        for name, r in tasks.items():
            start = "-" if r["agreement_before"] is None else f"{r['agreement_before']:.3f}"
            console.print(
                f"{name}: agreement with the teacher {start} -> {r['agreement_after']:.3f}; "
                f"teacher accuracy {r['teacher_accuracy']:.4f}, student "
                f"{r['student_accuracy']:.4f}"
            )
    return summary


def resume_settings(run_dir: Path) -> dict[str, Any]:
    """distill.json of a distilled run (teacher, temperature, alpha)."""
    path = run_dir / INFO_FILE
    if not path.is_file():
        raise BitblendError(f"--resume {run_dir}: no {INFO_FILE}; not a distilled run")
    return dict(json.loads(path.read_text()))
