"""A finished `model.backbone: tfidf-logreg` run: TF-IDF + logistic regression weights.

model/ holds no pickle: `classic.json` (format, settings, heads, label names, vocabularies)
and `classic.safetensors` (per task: idf (V,), coef (C or 1, V), intercept (C or 1,)).
Fitting lives in ensemble/classic.py; the file format and the loaded run live here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.feature_extraction.text import TfidfVectorizer

from bitblend.config.classic import CLASSIC
from bitblend.config.schema import Recipe, TaskConfig
from bitblend.data.sources import load_task_data
from bitblend.data.table import Table
from bitblend.errors import BitblendError
from bitblend.runs.base import find_task

MODEL_FILE = "classic.json"
WEIGHTS_FILE = "classic.safetensors"
FORMAT = 1


@dataclass
class ClassicTask:
    """One task's fitted TF-IDF vocabulary and linear model."""

    name: str
    head: str
    label_names: list[str]
    vocabulary: list[str]  # term of each feature column, in column order
    idf: np.ndarray  # (V,) float64
    coef: np.ndarray  # (C, V), or (1, V) for binary heads
    intercept: np.ndarray  # (C,) or (1,)
    settings: dict[str, Any] = field(default_factory=dict)  # TfidfVectorizer arguments
    _vectorizer: Any = None

    def vectorizer(self) -> Any:
        """The fitted TfidfVectorizer, rebuilt from the vocabulary and idf (no pickle)."""
        if self._vectorizer is None:
            vec = TfidfVectorizer(
                vocabulary={t: i for i, t in enumerate(self.vocabulary)},
                ngram_range=(1, int(self.settings["ngrams"])),
                sublinear_tf=bool(self.settings["sublinear_tf"]),
                lowercase=True,
                dtype=np.float64,
            )
            vec.idf_ = self.idf
            self._vectorizer = vec
        return self._vectorizer

    def outputs(self, texts: list[str]) -> np.ndarray:
        """Logits (n, C), or (n, 1) for a binary head: what the linear model decides."""
        x = self.vectorizer().transform([str(t) for t in texts])
        return np.asarray(x @ self.coef.T + self.intercept, dtype=np.float32)

    @property
    def num_features(self) -> int:
        """Vocabulary size V."""
        return len(self.vocabulary)


def save_classic(directory: Path, models: list[ClassicTask]) -> None:
    """Write classic.json and classic.safetensors (numpy arrays, no pickle)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"format": FORMAT, "backbone": CLASSIC, "tasks": []}
    for m in models:
        tensors[f"{m.name}.idf"] = np.ascontiguousarray(m.idf)
        tensors[f"{m.name}.coef"] = np.ascontiguousarray(m.coef)
        tensors[f"{m.name}.intercept"] = np.ascontiguousarray(m.intercept)
        meta["tasks"].append(
            {
                "name": m.name,
                "head": m.head,
                "label_names": m.label_names,
                "settings": m.settings,
                "vocabulary": m.vocabulary,
            }
        )
    save_file(tensors, str(directory / WEIGHTS_FILE))
    (directory / MODEL_FILE).write_text(json.dumps(meta) + "\n")


def read_classic(directory: Path) -> list[ClassicTask]:
    """Reload what `save_classic` wrote."""
    path = directory / MODEL_FILE
    if not path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise BitblendError(f"{directory}: no {MODEL_FILE} + {WEIGHTS_FILE} (did the run finish?)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise BitblendError(f"{path}: format {meta.get('format')!r}, expected {FORMAT}")
    arrays = load_file(str(directory / WEIGHTS_FILE))
    out = []
    for t in meta["tasks"]:
        name = t["name"]
        try:
            idf, coef = arrays[f"{name}.idf"], arrays[f"{name}.coef"]
            intercept = arrays[f"{name}.intercept"]
        except KeyError as exc:
            raise BitblendError(f"{directory / WEIGHTS_FILE}: no tensor {exc}") from None
        if coef.shape[1] != len(t["vocabulary"]) or idf.shape[0] != len(t["vocabulary"]):
            raise BitblendError(f"{directory / WEIGHTS_FILE}: shapes do not match {MODEL_FILE}")
        out.append(
            ClassicTask(
                name,
                t["head"],
                t["label_names"],
                t["vocabulary"],
                idf,
                coef,
                intercept,
                t["settings"],
            )
        )
    return out


@dataclass
class TfidfRun:
    """A finished tfidf-logreg run, answering the same calls as a transformer run."""

    run_dir: Path
    recipe: Recipe
    models: dict[str, ClassicTask]

    @property
    def tasks(self) -> list[TaskConfig]:
        """The recipe's tasks."""
        return self.recipe.tasks

    def task(self, name: str | None) -> tuple[int, TaskConfig]:
        """The task called `name`, or the only task when `name` is None."""
        return find_task(self.recipe.tasks, name)

    def head(self, task: str) -> str:
        """classification or binary."""
        return self.models[task].head

    def label_names(self, task: str) -> list[str]:
        """Class names in output order."""
        return list(self.models[task].label_names)

    def outputs(self, task: str, table: Table) -> np.ndarray:
        """Logits (n, C) or (n, 1) of `task` on a text table."""
        if table.text is None:
            raise BitblendError(f"--task {task}: a {CLASSIC} model needs a text column")
        return self.models[task].outputs(list(table.text))

    def eval_split(self, task: str) -> tuple[Table, np.ndarray]:
        """The recipe's held-out table of `task` and its targets."""
        i, cfg = self.task(task)
        td = load_task_data(cfg, i, self.recipe.train.seed)
        return td.eval, td.eval_targets


def load_tfidf(run_dir: Path, recipe: Recipe) -> TfidfRun:
    """Reload a tfidf-logreg run directory."""
    model_dir = run_dir / "model"
    if not model_dir.is_dir():
        raise BitblendError(f"{run_dir}: the run has no final model/ (did it finish?)")
    models = {m.name: m for m in read_classic(model_dir)}
    missing = [t.name for t in recipe.tasks if t.name not in models]
    if missing:
        raise BitblendError(f"{model_dir / MODEL_FILE}: no model for task(s) {', '.join(missing)}")
    return TfidfRun(run_dir, recipe, models)
