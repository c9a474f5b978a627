"""Model-level mixing without training: metrics, temperature, combiners, merge arithmetic,
the distillation loss and the classic model's pickle-free round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, log_loss

from bitblend.ensemble.distill import KDLoss
from bitblend.ensemble.merge import merge_states, task_arithmetic, ties, uniform
from bitblend.ensemble.spec import fit_ensemble
from bitblend.errors import BitblendError
from bitblend.runs.combine import Combiner, cross_fit
from bitblend.runs.spec import split_indices
from bitblend.tasks import calibration as cal


def synthetic(n: int = 400, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(3 members, n, C) probabilities and gold ids: a good, a weaker and a noise member."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    onehot = np.eye(classes)[y]
    members = []
    for signal in (3.0, 1.0, 0.0):
        logits = signal * onehot + rng.normal(0, 1.0, (n, classes))
        members.append(cal.to_probs("classification", logits))
    return np.stack(members), y


# -- calibration metrics ----------------------------------------------------------------
def test_metrics_match_hand_and_sklearn() -> None:
    """NLL = sklearn log_loss, Brier by hand, macro-F1 = sklearn, ECE on a worked example."""
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1]])
    y = np.array([0, 1, 0, 2])
    m = cal.metrics(p, y)
    assert m["accuracy"] == 0.5
    assert m["nll"] == pytest.approx(log_loss(y, p, labels=[0, 1, 2]))
    brier = np.mean([0.3**2 + 0.2**2 + 0.1**2, 0.1**2 + 0.2**2 + 0.1**2,
                     0.7**2 + 0.3**2 + 0.4**2, 0.6**2 + 0.3**2 + 0.9**2])  # fmt: skip
    assert m["brier"] == pytest.approx(brier)
    assert m["macro_f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    # Confidences 0.7, 0.8, 0.4, 0.6 fall in 4 different bins of 15; correct: 1, 1, 0, 0.
    assert m["ece"] == pytest.approx((0.3 + 0.2 + 0.4 + 0.6) / 4)


def test_binary_outputs_round_trip() -> None:
    """A binary logit becomes [1-p, p] and back."""
    z = np.array([[-2.0], [0.0], [3.0]], dtype=np.float32)
    p = cal.to_probs("binary", z)
    assert np.allclose(p.sum(1), 1) and p[2, 1] == pytest.approx(1 / (1 + np.exp(-3.0)))
    assert np.allclose(cal.to_outputs("binary", p), z, atol=1e-5)


def test_temperature_softens_an_overconfident_model() -> None:
    """Logits x5 are overconfident: T is near 5, NLL falls, the argmax never changes."""
    probs, y = synthetic()
    logp = 5.0 * cal.log_probs(probs[1])
    temp = cal.Temperature().fit(logp, y)
    assert 3.5 < temp.value < 7.0
    before, after = cal.nll(cal.scale(logp, 1.0), y), cal.nll(temp.apply(logp), y)
    assert after < before
    assert (temp.apply(logp).argmax(1) == logp.argmax(1)).all()
    again = cal.Temperature()
    again.load_state_dict(temp.state_dict())
    assert again.value == temp.value


# -- combiners ----------------------------------------------------------------------------
def test_mean_and_vote() -> None:
    """mean averages; vote follows the majority and keeps every probability > 0."""
    probs, _ = synthetic(50)
    assert np.allclose(Combiner("mean", 3, 4).predict(probs), probs.mean(0))
    vote = Combiner("vote", 3, 4).predict(probs)
    assert np.allclose(vote.sum(1), 1) and (vote > 0).all()
    votes = np.stack([np.bincount(probs[:, i].argmax(1), minlength=4) for i in range(50)])
    majority = votes.max(1) >= 2
    assert (vote.argmax(1)[majority] == votes.argmax(1)[majority]).all()


def test_weighted_puts_weight_on_the_informative_member() -> None:
    """Fitted simplex weights: most on the good member, almost none on noise."""
    probs, y = synthetic()
    c = Combiner("weighted", 3, 4).fit(probs, y)
    assert c.weights.sum() == pytest.approx(1.0)
    assert c.weights[0] > 0.6 and c.weights[2] < 0.1
    assert cal.nll(c.predict(probs), y) <= cal.nll(probs.mean(0), y)


def test_product_of_one_member_is_temperature_scaling() -> None:
    """Log-linear pooling of one member: its weight is 1/T, the same fit as Temperature."""
    probs, y = synthetic()
    logp = 2.0 * cal.log_probs(probs[1])  # over-confident
    member = cal.scale(logp, 1.0)[None]
    assert member.min() > 1e-6  # above the log floor, where pooling is exactly this
    c = Combiner("product", 1, 4).fit(member, y)
    temp = cal.Temperature().fit(logp, y)
    assert c.weights[0] == pytest.approx(1.0 / temp.value, rel=1e-3)
    assert np.allclose(c.predict(member), cal.scale(logp, temp.value), atol=1e-4)


def test_product_beats_its_best_member_when_members_add_information() -> None:
    """Two members, each seeing half of the evidence: the pooled NLL is below the better
    member's even after that member is temperature-scaled; weights survive a round trip."""
    rng = np.random.default_rng(0)
    n, k = 2000, 4
    y = rng.integers(0, k, n)
    signal = np.eye(k)[y] * 1.5
    a = signal + rng.normal(size=(n, k))
    b = signal + rng.normal(size=(n, k))
    probs = np.stack([cal.scale(a, 1.0), cal.scale(b, 1.0)])
    c = Combiner("product", 2, k).fit(probs, y)
    assert (c.weights > 0.5).all()
    best = min(cal.nll(cal.Temperature().fit(np.log(p), y).apply(np.log(p)), y) for p in probs)
    assert cal.nll(c.predict(probs), y) < 0.95 * best
    again = Combiner.from_state(c.state_dict())
    assert np.array_equal(again.predict(probs), c.predict(probs))


@pytest.mark.slow
def test_stack_state_round_trip_and_cross_fit() -> None:
    """A stacked combiner saved as JSON-ready state predicts identically when reloaded."""
    probs, y = synthetic()
    c = Combiner("stack", 3, 4).fit(probs, y)
    again = Combiner.from_state(c.state_dict())
    assert np.array_equal(again.predict(probs), c.predict(probs))
    oof = cross_fit(c, probs, y)
    assert oof.shape == (400, 4) and np.allclose(oof.sum(1), 1)
    # Out-of-fold predictions are honest: no better than the in-sample fit on its own data.
    assert cal.nll(oof, y) >= cal.nll(c.predict(probs), y) - 1e-9


@pytest.mark.parametrize(
    ("method", "calibrate"),
    [
        pytest.param("stack", False, marks=pytest.mark.slow),  # cross-fitted stacking: > 2 s
        ("weighted", False),
        pytest.param("product", False, marks=pytest.mark.slow),
        pytest.param("stack", True, marks=pytest.mark.slow),
    ],
)
def test_fitting_never_reads_test_labels(method: str, calibrate: bool) -> None:
    """Corrupt every test label: the fitted combiner, temperatures and predictions are
    identical (only the scores change). Corrupting validation labels does change them."""
    probs, y = synthetic(600)
    val_idx, test_idx = split_indices(600, 0.5, 0)
    val, test = probs[:, val_idx], probs[:, test_idx]
    c1, r1 = fit_ensemble(method, val, y[val_idx], test, y[test_idx], 0, calibrate)
    bad = (y[test_idx] + 1) % 4  # every test label wrong
    c2, r2 = fit_ensemble(method, val, y[val_idx], test, bad, 0, calibrate)
    assert c1.state_dict() == c2.state_dict()
    assert np.array_equal(c1.predict(test), c2.predict(test))
    assert r1["ensemble"]["temperature"] == r2["ensemble"]["temperature"]
    assert [m["temperature"] for m in r1["members"]] == [m["temperature"] for m in r2["members"]]
    assert r1["ensemble"]["before"]["accuracy"] != r2["ensemble"]["before"]["accuracy"]
    c3, _ = fit_ensemble(method, val, (y[val_idx] + 1) % 4, test, y[test_idx])
    assert c3.state_dict() != c1.state_dict()  # the check above is not vacuous


def test_calibrating_members_first_credits_an_underconfident_member() -> None:
    """The best member, made under-confident (logits x 0.15), gets little weight from raw
    probabilities; temperature-scaled first, it gets most of it and the NLL falls."""
    probs, y = synthetic(800)
    probs[0] = cal.scale(cal.log_probs(probs[0]), 1 / 0.15)
    val_idx, test_idx = split_indices(800, 0.5, 0)
    val, test = probs[:, val_idx], probs[:, test_idx]
    raw, r_raw = fit_ensemble("weighted", val, y[val_idx], test, y[test_idx])
    cal_c, r_cal = fit_ensemble("weighted", val, y[val_idx], test, y[test_idx], 0, True)
    assert cal_c.weights[0] > 0.6 > raw.weights[0]
    assert r_cal["ensemble"]["before"]["nll"] < r_raw["ensemble"]["before"]["nll"]


def test_split_ignores_labels_and_is_seeded() -> None:
    """The validation/test split depends on n and seed only."""
    a, b = split_indices(100, 0.5, 3)
    assert len(a) == 50 and not set(a) & set(b) and len(set(a) | set(b)) == 100
    assert np.array_equal(split_indices(100, 0.5, 3)[0], a)
    assert not np.array_equal(split_indices(100, 0.5, 4)[0], a)
    with pytest.raises(BitblendError, match="--val-fraction"):
        split_indices(100, 1.5, 0)


def test_ensemble_of_one_equals_its_member() -> None:
    """One member, mean: the ensemble's probabilities and report equal the member's."""
    probs, y = synthetic()
    val_idx, test_idx = split_indices(400, 0.5, 0)
    one = probs[:1]
    c, r = fit_ensemble("mean", one[:, val_idx], y[val_idx], one[:, test_idx], y[test_idx])
    assert np.array_equal(c.predict(one[:, test_idx]), one[0, test_idx])
    assert r["ensemble"] == r["members"][0]


# -- merge arithmetic ---------------------------------------------------------------------
def test_merging_identical_tensors_is_the_identity() -> None:
    """uniform, task arithmetic with scale 1/n, TIES with density 1: all give the model."""
    torch.manual_seed(0)
    base, theta = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.equal(uniform([theta, theta]), theta)
    assert torch.allclose(task_arithmetic(base, [theta, theta], 0.5), theta, atol=1e-6)
    assert torch.allclose(ties(base, [theta, theta, theta], 1.0, 1.0), theta, atol=1e-6)


def test_uniform_equals_hand_average_and_ints_are_kept() -> None:
    """merge_states: floats averaged, integer buffers copied, a one-run key kept as is."""
    a = {"w": torch.tensor([1.0, 2.0]), "ids": torch.tensor([0, 1]), "only_a": torch.ones(2)}
    b = {"w": torch.tensor([3.0, 6.0]), "ids": torch.tensor([0, 1])}
    m = merge_states([a, b], "uniform")
    assert torch.equal(m["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(m["ids"], a["ids"]) and torch.equal(m["only_a"], a["only_a"])


def test_ties_trims_elects_and_averages() -> None:
    """A worked TIES example: density 2/3 drops the smallest entry of each task vector;
    the elected sign keeps only agreeing entries; their mean is added to the base."""
    base = torch.zeros(3)
    t1 = torch.tensor([1.0, -0.1, 2.0])  # trimmed: [1, 0, 2]
    t2 = torch.tensor([3.0, 1.0, -0.5])  # trimmed: [3, 1, 0]
    t3 = torch.tensor([-1.0, 2.0, 0.2])  # trimmed: [-1, 2, 0]
    out = ties(base, [t1, t2, t3], 1.0, 2 / 3)
    # entry 0: sum 3 > 0, agreeing 1 and 3 -> 2; entry 1: 1 and 2 -> 1.5; entry 2: 2 -> 2
    assert torch.allclose(out, torch.tensor([2.0, 1.5, 2.0]))


# -- distillation loss --------------------------------------------------------------------
def test_kd_loss_is_zero_at_the_teacher_and_mixes_hard_loss() -> None:
    """A student equal to its teacher has KD 0; alpha weighs KD against the hard loss."""
    torch.manual_seed(0)
    teacher = torch.randn(6, 4)
    soft = torch.softmax(teacher / 2.0, dim=-1)
    hook = KDLoss(soft, "classification", 2.0, 0.25)
    idx = np.array([4, 1, 2])
    assert float(hook.kd(teacher[idx], idx)) == pytest.approx(0.0, abs=1e-6)
    student = torch.zeros(3, 4)
    kd = float(hook.kd(student, idx))
    assert kd > 0
    total = hook(student, torch.tensor(1.0), idx)
    assert float(total) == pytest.approx(0.25 * kd + 0.75 * 1.0, rel=1e-5)
    binary = KDLoss(torch.sigmoid(teacher[:, 0] / 2.0), "binary", 2.0, 1.0)
    assert float(binary.kd(teacher[idx, :1], idx)) == pytest.approx(0.0, abs=1e-6)


# -- the classic model --------------------------------------------------------------------
def test_classic_model_round_trips_without_pickle(tmp_path: Path, tiny_recipe: object) -> None:
    """save/read through JSON + safetensors predicts exactly what the fitted model did."""
    from bitblend.ensemble.classic import fit_task
    from bitblend.runs.tfidf import read_classic, save_classic

    recipe = tiny_recipe("model.backbone=tfidf-logreg")  # type: ignore[operator]
    texts = ["stocks fell", "the match ended", "shares rose sharply", "a late goal won it"] * 5
    y = np.array([0, 1, 0, 1] * 5)
    model, _ = fit_task(recipe.tasks[0], texts, y, ["money", "sport"], recipe)
    save_classic(tmp_path, [model])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classic.json", "classic.safetensors"]
    again = read_classic(tmp_path)[0]
    new = ["stocks and shares", "goal"]
    assert np.array_equal(again.outputs(new), model.outputs(new))
    assert model.outputs(new).argmax(1).tolist() == [0, 1]
