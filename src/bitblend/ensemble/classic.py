"""`model.backbone: tfidf-logreg`: TF-IDF + logistic regression (scikit-learn) as a run.

The Bag-of-Words era member of an ensemble. It trains from the same recipes (data, splits,
label maps) as the transformers and writes the same run directory: recipe.yaml,
labels.json, metrics.jsonl, eval.json, summary.json and model/. model/ holds no pickle:
`classic.json` (format, settings, heads, label names, vocabularies) and
`classic.safetensors` (per task: idf (V,), coef (C or 1, V), intercept (C or 1,)).
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitblend.config.schema import Recipe, TaskConfig
from bitblend.data.table import Table
from bitblend.errors import BitblendError

CLASSIC = "tfidf-logreg"
HEADS = ("classification", "binary")
MODEL_FILE = "classic.json"
WEIGHTS_FILE = "classic.safetensors"
FORMAT = 1


def check_classic_recipe(recipe: Recipe) -> None:
    """Heads and modalities a TF-IDF model can train (checked when the recipe loads)."""
    for i, task in enumerate(recipe.tasks):
        if task.head not in HEADS:
            raise BitblendError(
                f"tasks[{i}].head: model.backbone {CLASSIC} trains classification or binary "
                f"heads, got {task.head}"
            )
        if task.modality not in ("auto", "text"):
            raise BitblendError(
                f"tasks[{i}].modality: model.backbone {CLASSIC} needs text, got {task.modality}"
            )
        if task.tokenizer != "backbone":
            raise BitblendError(
                f"tasks[{i}].tokenizer: model.backbone {CLASSIC} has its own vocabulary; "
                "expected backbone"
            )


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
            from sklearn.feature_extraction.text import TfidfVectorizer

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


def fit_task(
    task: TaskConfig, texts: list[str], targets: np.ndarray, names: list[str], recipe: Recipe
) -> tuple[ClassicTask, int]:
    """Fit TF-IDF + logistic regression on one task; returns it and the solver's iterations."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    cfg = recipe.model
    settings = {
        "ngrams": cfg.tfidf_ngrams,
        "sublinear_tf": True,
        "max_features": cfg.tfidf_max_features,
        "C": cfg.logreg_c,
    }
    vec = TfidfVectorizer(
        ngram_range=(1, cfg.tfidf_ngrams),
        max_features=cfg.tfidf_max_features,
        sublinear_tf=True,  # log(1 + tf): long articles do not drown short ones
        lowercase=True,
        dtype=np.float64,
    )
    x = vec.fit_transform([str(t) for t in texts])
    y = targets.astype(np.int64)
    lr = LogisticRegression(C=cfg.logreg_c, max_iter=2000, random_state=recipe.train.seed)
    lr.fit(x, y)
    vocab = [""] * len(vec.vocabulary_)
    for term, col in vec.vocabulary_.items():
        vocab[col] = term
    coef, intercept = lr.coef_.astype(np.float64), lr.intercept_.astype(np.float64)
    if task.head == "classification" and coef.shape[0] == 1:
        # scikit-learn keeps one logit z for two classes; a classification head has one
        # column per class: [-z/2, z/2] has the same softmax (sigmoid(z) for class 1).
        coef, intercept = (
            np.vstack([-coef / 2, coef / 2]),
            np.hstack([-intercept / 2, intercept / 2]),
        )
    if task.head == "classification" and len(lr.classes_) != len(names):
        # Every class has a training example (label names come from the training split),
        # so this only guards the column order of coef against a future change.
        raise BitblendError(f"tasks: {task.name}: {len(lr.classes_)} classes seen, {len(names)}")
    model = ClassicTask(
        task.name,
        task.head,
        list(names),
        vocab,
        vec.idf_.astype(np.float64),
        coef,
        intercept,
        settings,
    )
    return model, int(np.max(lr.n_iter_))


def save_classic(directory: Path, models: list[ClassicTask]) -> None:
    """Write classic.json and classic.safetensors (numpy arrays, no pickle)."""
    from safetensors.numpy import save_file

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
    from safetensors.numpy import load_file

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
class ClassicRun:
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
        from bitblend.inference import find_task

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
        from bitblend.data.sources import load_task_data

        i, cfg = self.task(task)
        td = load_task_data(cfg, i, self.recipe.train.seed)
        return td.eval, td.eval_targets


def load_classic(run_dir: Path, recipe: Recipe) -> ClassicRun:
    """Reload a tfidf-logreg run directory."""
    model_dir = run_dir / "model"
    if not model_dir.is_dir():
        raise BitblendError(f"{run_dir}: the run has no final model/ (did it finish?)")
    models = {m.name: m for m in read_classic(model_dir)}
    missing = [t.name for t in recipe.tasks if t.name not in models]
    if missing:
        raise BitblendError(f"{model_dir / MODEL_FILE}: no model for task(s) {', '.join(missing)}")
    return ClassicRun(run_dir, recipe, models)


def train_classic(recipe: Recipe, run_dir: Path, console: Any = None) -> dict[str, Any]:
    """`bitblend train` for model.backbone tfidf-logreg: fit, evaluate, write the run dir."""
    from bitblend.config.load import dump_recipe
    from bitblend.inference import output_loss
    from bitblend.report.console import metrics_table
    from bitblend.report.sinks import JsonlSink
    from bitblend.train.evaluate import score
    from bitblend.train.run_dir import write_json
    from bitblend.train.setup import load_data

    check_classic_recipe(recipe)
    if recipe.train.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(recipe.train.threads)
    wall0 = time.perf_counter()
    datas = load_data(recipe)
    models: list[ClassicTask] = []
    records: list[dict[str, Any]] = []
    evals: dict[str, dict[str, float]] = {}
    fit_time, words = 0.0, 0
    # Everything is fitted and scored before the run directory is created: a failed run
    # writes nothing.
    for i, (task, data) in enumerate(zip(recipe.tasks, datas, strict=True)):
        if data.train.modalities != ["text"] or data.eval.text is None:
            raise BitblendError(
                f"tasks[{i}].data: {task.data} has {', '.join(data.train.modalities)} data; "
                f"model.backbone {CLASSIC} needs text only"
            )
        assert data.train.text is not None
        texts = [str(t) for t in data.train.text]
        t0 = time.perf_counter()
        model, iters = fit_task(task, texts, data.train_targets, data.label_names, recipe)
        seconds = time.perf_counter() - t0
        fit_time += seconds
        n_words = sum(len(t.split()) for t in texts)
        words += n_words
        train_out = model.outputs(texts)
        eval_out = model.outputs(list(data.eval.text))
        limit = recipe.train.eval_max_examples
        ev_out, ev_gold = eval_out[:limit], data.eval_targets[:limit]
        evals[task.name] = {
            **score(task.head, ev_out, ev_gold),
            "loss": output_loss(task.head, ev_out, ev_gold),
            "examples": len(ev_out),
        }
        records.append(
            {
                "step": 1,
                "split": "train",
                "task": task.name,
                "loss": output_loss(task.head, train_out, data.train_targets),
                "lr": None,
                "grad_norm": None,
                "loss_scale": None,
                "skipped": False,
                "tokens": n_words,
                "tokens_per_s": n_words / max(seconds, 1e-9),
                "iterations": iters,
                "features": model.num_features,
            }
        )
        records.append({"step": 1, "split": "eval", "task": task.name, **evals[task.name]})
        models.append(model)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    labels = {t.name: d.label_names for t, d in zip(recipe.tasks, datas, strict=True)}
    write_json(run_dir / "labels.json", labels)
    sink = JsonlSink(run_dir / "metrics.jsonl")
    for r in records:
        sink.write(r)
    sink.close()
    write_json(run_dir / "eval.json", {"step": 1, "tasks": evals})
    save_classic(run_dir / "model", models)
    params = sum(m.coef.size + m.intercept.size for m in models)
    summary = {
        "recipe": recipe.name,
        "backbone": CLASSIC,
        "steps": 1,
        "skipped_steps": 0,
        "tokens": words,  # whitespace words: TF-IDF has no subword tokens
        "tokens_per_s": words / max(fit_time, 1e-9),
        "train_time_s": fit_time,
        "wall_time_s": time.perf_counter() - wall0,
        "peak_memory_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
        "precision": {
            "recipe": "float64",
            "requested": recipe.precision.recipe,
            "note": "scikit-learn fits in float64; precision.* does not apply",
        },
        "parameters": int(params),
        "features": {m.name: m.num_features for m in models},
        "device": "cpu",
        "eval": evals,
    }
    write_json(run_dir / "summary.json", summary)
    if console is not None:
        console.print(metrics_table(f"{recipe.name}: {CLASSIC}", evals))
        console.print(f"fit in {fit_time:.1f}s, {params:,} weights -> {run_dir}")
    return summary
