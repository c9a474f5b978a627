"""Refit a task's classification head on the final trunk (`train.head_refit`).

Why: in a mixture a small task's head trains for a few dozen steps while the trunk under it
keeps moving for the other tasks, so at the end the head lags the trunk's own features.
Measured on the demo (docs/mixing.md): breast cancer's eval rows ranked with AUC .997 at
.947 accuracy, digits' head right on only .946 of its own training images; logistic
regression on the final trunk's pooled features of the *training* split took both to their
scikit-learn baselines. This is the classifier re-training step of decoupled training
(Kang et al., 2020): freeze the representation, refit the linear readout.

Only the training split is used to fit and to choose the L2 strength (stratified k-fold
cross-validation over a small grid, the one-standard-error rule); the eval split is scored
before and after for the record and never decides anything. The refit weights go into the
head's final Linear (fp32 under every precision recipe: heads are in `fp32_module_names`),
so saving, predicting, serving and exporting see an ordinary head.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from bitblend.data.modalities import EncodedSplit
from bitblend.models.trunk import LinearShortcut, MultiTaskModel
from bitblend.train.evaluate import BatchSpec, evaluate_split

C_GRID = (0.01, 0.1, 1.0, 10.0)  # inverse L2 strength, on standardised features
# How C is chosen from the CV scores (`choose_c`): the one-standard-error rule. The best CV
# mean overfitted breast cancer's joint readout in the four-modality mixture (C=1, training
# accuracy 1.000, eval .930); 1se gave .947 there and the same demo means over 3 seeds
# (docs/mixing.md, "Head refit": benchmarks/head_refit_rules.py on the saved runs).
RULE = "1se"
MAX_ROWS = 8192  # training rows fitted at most (a seeded sample above): bounded cost
HEADS = ("classification", "binary")
NON_TEXT = ("image", "tabular", "audio")


def readout(model: MultiTaskModel, task: str) -> nn.Linear:
    """The final Linear of a pooled head (heads are Sequential(Dropout, Linear))."""
    head: Any = model.heads[task]
    linear = head[-1]
    assert isinstance(linear, nn.Linear)
    return linear


def readouts(model: MultiTaskModel, task: str) -> list[nn.Module]:
    """The linear maps whose outputs sum to the task's logits: the head's final Linear and,
    when the task has one, its shortcut (a Linear on the raw pixels / features: wide &
    deep). Each has `weight` (outputs, in) and `bias`; the refit fits them as one readout."""
    mods: list[nn.Module] = [readout(model, task)]
    if task in model.shortcuts:
        mods.append(model.shortcuts[task])
    return mods


def skip_reason(model: MultiTaskModel, task: str, mode: str, sharded: bool) -> str | None:
    """Why `task`'s head is not refitted under `mode` (None: it is)."""
    spec = model.specs[task]
    if mode == "off":
        return "head_refit: off"
    if spec.head not in HEADS:
        return f"no refit for a {spec.head} head"
    if mode == "auto" and not any(m in spec.modalities for m in NON_TEXT):
        return "auto refits image / tabular / audio tasks only"
    if sharded:
        return "not under fsdp2 (the head is sharded)"
    return None


@torch.no_grad()
def pooled_features(
    model: MultiTaskModel, task: str, split: EncodedSplit, spec: BatchSpec, rows: np.ndarray
) -> np.ndarray:
    """(len(rows), width) float32: what the task's readouts read, in eval mode - the pooled
    trunk output of the head's Linear, then (with a shortcut) the raw inputs' features.
    Taken by pre-hooks so the model's own forward runs (FSDP2 and every modality path
    included) rather than a copy of it."""
    mods: list[Any] = readouts(model, task)
    seen: list[list[torch.Tensor]] = [[] for _ in mods]

    def keep(got: list[torch.Tensor]) -> Any:
        # A Linear reads its input; a shortcut reads the features of its inputs dict.
        def hook(m: Any, args: tuple[Any, ...]) -> None:
            x = m.features(args[0]) if isinstance(m, LinearShortcut) else args[0]
            got.append(x.float().cpu())

        return hook

    hooks = [m.register_forward_pre_hook(keep(got)) for m, got in zip(mods, seen, strict=True)]
    was_training = model.training
    model.eval()
    width = sum(int(m.weight.shape[1]) for m in mods)
    out = np.zeros((len(rows), width), dtype=np.float32)
    try:
        for s in range(0, len(rows), spec.batch_size):
            idx = np.arange(s, min(s + spec.batch_size, len(rows)))
            batch = spec.collate(split, rows[idx])
            for got in seen:
                got.clear()
            with spec.context():
                model(task, **batch)
            out[idx] = torch.cat([got[-1] for got in seen], dim=1).numpy()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return out


def choose_c(scores: dict[float, np.ndarray], rule: str) -> float:
    """The grid's C for per-fold CV accuracies `scores`. `best`: the highest mean (ties: the
    C nearest 1). `1se`: the strongest regularisation (smallest C) whose mean is within one
    standard error of the best mean - the one-standard-error rule (Breiman et al. 1984;
    glmnet's lambda.1se), which trades a CV difference the folds cannot resolve for a
    simpler readout."""
    if rule not in ("best", "1se"):
        raise ValueError(f"head refit: unknown C rule {rule!r} (best or 1se)")
    means = {c: float(np.mean(v)) for c, v in scores.items()}
    best = max(scores, key=lambda c: (means[c], -abs(np.log10(c))))
    if rule == "best":
        return best
    folds = len(scores[best])
    se = float(np.std(scores[best], ddof=1) / np.sqrt(folds)) if folds > 1 else 0.0
    return min(c for c in scores if means[c] >= means[best] - se)


def fit_readout(x: np.ndarray, y: np.ndarray, seed: int, rule: str = RULE) -> dict[str, Any]:
    """L2 logistic regression on standardised `x`, C chosen by stratified k-fold CV on these
    rows alone (`choose_c`'s `rule`); coefficients folded back to the raw features. Returns
    coef (K or 1, width), intercept, classes, C and the CV accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std < 1e-6] = 1.0
    z = (x - mean) / std
    _, counts = np.unique(y, return_counts=True)
    folds = int(min(3, counts.min()))
    scores: dict[float, np.ndarray] = {}
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")  # convergence chatter on separable folds
        for c in C_GRID:
            lr = LogisticRegression(C=c, max_iter=500)
            if folds >= 2:
                cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
                scores[c] = np.asarray(cross_val_score(lr, z, y, cv=cv), dtype=np.float64)
            else:  # a class with one example: no CV, the middle of the grid
                scores[c] = np.array([1.0 if c == 1.0 else 0.0])
        best = choose_c(scores, rule)
        lr = LogisticRegression(C=best, max_iter=1000).fit(z, y)
    coef = lr.coef_ / std  # w.z + b = (w / std).x + (b - w.mean / std)
    intercept = lr.intercept_ - coef @ mean
    return {
        "coef": coef,
        "intercept": intercept,
        "classes": lr.classes_,
        "C": best,
        "cv_accuracy": float(np.mean(scores[best])),
        "train_accuracy": float(lr.score(z, y)),
    }


def head_weights(fit: dict[str, Any], head: str, outputs: int) -> tuple[np.ndarray, np.ndarray]:
    """The fitted readout as the head's (outputs, width) weight and (outputs,) bias."""
    coef, intercept = fit["coef"], fit["intercept"]
    if head == "binary":  # one logit, BCE: exactly logistic regression's
        return coef[:1], intercept[:1]
    if coef.shape[0] == 1:  # two classes: sklearn keeps one row; softmax of (-z/2, z/2)
        return np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
    return coef, intercept


def refit_rows(n: int, seed: int) -> np.ndarray:
    """The training rows a refit fits: all `n`, or a seeded sorted sample of MAX_ROWS."""
    if n <= MAX_ROWS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, MAX_ROWS, replace=False))


def refit_task(
    model: MultiTaskModel,
    task: str,
    train: EncodedSplit,
    spec: BatchSpec,
    seed: int,
) -> dict[str, Any] | None:
    """Refit one head in place; None when the training split lacks a class (the head keeps
    its trained rows rather than inventing a readout for a class it never saw)."""
    head = model.specs[task].head
    outputs = model.specs[task].num_outputs
    rows = refit_rows(len(train), seed)
    y = np.asarray(train.targets)[rows].astype(np.int64)
    expected = 2 if head == "binary" else outputs
    if len(np.unique(y)) != expected:
        return None
    x = pooled_features(model, task, train, spec, rows)
    mods: list[Any] = readouts(model, task)
    w0 = np.concatenate([m.weight.detach().float().cpu().numpy() for m in mods], axis=1)
    b0 = sum(m.bias.detach().float().cpu().numpy() for m in mods)
    before = x @ w0.T + b0
    fit = fit_readout(x, y, seed)
    weight, bias = head_weights(fit, head, outputs)
    # One readout over [pooled trunk, raw inputs]: its columns split back into the head's
    # Linear and the shortcut's; the bias stays on the head, the shortcut's becomes 0.
    start = 0
    with torch.no_grad():
        for i, m in enumerate(mods):
            cols = int(m.weight.shape[1])
            m.weight.copy_(torch.from_numpy(weight[:, start : start + cols]).to(m.weight))
            m.bias.copy_(torch.from_numpy(bias if i == 0 else np.zeros_like(bias)).to(m.bias))
            start += cols
    pred = (before[:, 0] > 0).astype(np.int64) if head == "binary" else before.argmax(axis=1)
    return {
        "C": fit["C"],
        "cv_accuracy": fit["cv_accuracy"],
        "train_accuracy_before": float((pred == y).mean()),
        "train_accuracy_after": fit["train_accuracy"],
        "rows": len(rows),
        "readout": "head + shortcut" if len(mods) == 2 else "head",
    }


def refit_heads(
    model: MultiTaskModel,
    tasks: list[Any],
    mode: str,
    *,
    sharded: bool,
    eval_limit: int | None,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Refit every eligible task's head (tasks: train/setup.py's TaskRuntime); per task
    the record for summary.json: either the fit (C, CV accuracy, training accuracy before
    and after, the eval metrics before, seconds) or `skipped` with the reason."""
    out: dict[str, dict[str, Any]] = {}
    for t in tasks:
        reason = skip_reason(model, t.name, mode, sharded)
        if reason is not None:
            if mode != "off" and model.specs[t.name].head in HEADS:
                out[t.name] = {"skipped": reason}
            continue
        t0 = time.perf_counter()
        before = evaluate_split(model, t.name, t.eval, t.batch, t.loss, eval_limit)
        rec = refit_task(model, t.name, t.train, t.batch, seed)
        if rec is None:
            out[t.name] = {"skipped": "a class is missing from the training split"}
            continue
        out[t.name] = {
            **rec,
            "eval_before": {k: v for k, v in before.items() if k != "examples"},
            "seconds": time.perf_counter() - t0,
        }
    return out


def run_head_refit(
    model: MultiTaskModel, tasks: list[Any], cfg: Any, dist: Any, console: Any
) -> dict[str, dict[str, Any]] | None:
    """The trainer's end-of-run hook (cfg: TrainConfig, dist: DistContext). Every rank
    fits (same weights, same rows); rank 0's heads are then sent to all, so DDP replicas
    stay identical even if a BLAS summed in another order. Prints one line per head."""
    done = refit_heads(
        model, tasks, cfg.head_refit, sharded=dist.sharded,
        eval_limit=cfg.eval_max_examples, seed=cfg.seed,
    )  # fmt: skip
    fitted = [n for n, r in done.items() if "skipped" not in r]
    if fitted and dist.world_size > 1:
        heads = {n: [m.state_dict() for m in readouts(model, n)] for n in fitted}
        for n, sds in dist.broadcast(heads).items():
            for m, sd in zip(readouts(model, n), sds, strict=True):
                m.load_state_dict(sd)
    for n in fitted:
        r = done[n]
        console.print(
            f"head refit {n}: C={r['C']:g} (cv accuracy {r['cv_accuracy']:.3f}), training "
            f"accuracy {r['train_accuracy_before']:.3f} -> {r['train_accuracy_after']:.3f}",
            markup=False, highlight=False,
        )  # fmt: skip
    return done or None
