"""`model.backbone: tfidf-logreg`: fitting TF-IDF + logistic regression (scikit-learn) as a run.

The Bag-of-Words era member of an ensemble. It trains from the same recipes (data, splits,
label maps) as the transformers and writes the same run directory: recipe.yaml,
labels.json, metrics.jsonl, eval.json, summary.json and model/ (format: runs/tfidf.py, which
also loads it back). The recipe rules live in config/classic.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from bitblend.config.classic import CLASSIC, check_classic_recipe
from bitblend.config.load import dump_recipe
from bitblend.config.schema import Recipe, TaskConfig
from bitblend.errors import BitblendError
from bitblend.procmem import peak_rss_bytes
from bitblend.report.console import metrics_table
from bitblend.report.sinks import JsonlSink
from bitblend.runs.evaluate import output_loss
from bitblend.runs.tfidf import ClassicTask, save_classic
from bitblend.taskspec import load_data
from bitblend.train.evaluate import score
from bitblend.train.run_dir import write_json


def fit_task(
    task: TaskConfig, texts: list[str], targets: np.ndarray, names: list[str], recipe: Recipe
) -> tuple[ClassicTask, int]:
    """Fit TF-IDF + logistic regression on one task; returns it and the solver's iterations."""
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


def train_classic(recipe: Recipe, run_dir: Path, console: Any = None) -> dict[str, Any]:
    """`bitblend train` for model.backbone tfidf-logreg: fit, evaluate, write the run dir."""
    check_classic_recipe(recipe)
    if recipe.train.threads:
        # scikit-learn's own dependency; imported only when a thread cap is asked for.
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
        "peak_memory_bytes": peak_rss_bytes(),
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
