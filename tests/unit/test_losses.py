"""Loss items and step-normalised token losses (tasks/losses.py), and the balancer's
per-micro-batch contract (tasks/balancing.py): parts of a step add up to the step's loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bitblend.tasks.balancing import Balancer
from bitblend.tasks.losses import IGNORE, compute_loss, loss_items


def _labels(lengths: list[int], seq: int) -> torch.Tensor:
    out = torch.full((len(lengths), seq), IGNORE)
    for r, n in enumerate(lengths):
        out[r, :n] = torch.arange(n) % 5
    return out


def test_loss_items_count_what_the_mean_divides_by() -> None:
    labels = _labels([3, 1, 6], 6)
    assert loss_items("token_classification", labels) == 10
    assert loss_items("masked_lm", labels) == 10
    assert loss_items("causal_lm", labels) == 2 + 0 + 5  # position t predicts t + 1
    assert loss_items("classification", torch.tensor([0, 1, 1])) == 3
    assert loss_items("multilabel", torch.zeros(4, 3)) == 4


@pytest.mark.parametrize("head", ["token_classification", "causal_lm"])
def test_parts_of_a_step_add_up_to_its_per_token_mean(head: str) -> None:
    """Two ragged micro-batches: token sums over the step's count add up to the mean of
    one batch holding both; the mean of the two means would not."""
    torch.manual_seed(0)
    a, b = _labels([6, 5], 6), _labels([2, 1, 2], 6)
    la, lb = torch.randn(2, 6, 5), torch.randn(3, 6, 5)
    total = loss_items(head, a) + loss_items(head, b)
    parts = [
        compute_loss("cross_entropy", x, y, head, num_items=total) for x, y in ((la, a), (lb, b))
    ]
    whole = compute_loss("cross_entropy", torch.cat([la, lb]), torch.cat([a, b]), head)
    torch.testing.assert_close(parts[0] + parts[1], whole)
    means = [compute_loss("cross_entropy", x, y, head) for x, y in ((la, a), (lb, b))]
    assert not math.isclose(float(means[0] + means[1]) / 2, float(whole), rel_tol=1e-3)


def test_a_micro_batch_without_labelled_tokens_adds_zero_not_nan() -> None:
    empty = torch.full((2, 4), IGNORE)
    logits = torch.randn(2, 4, 3, requires_grad=True)
    part = compute_loss("cross_entropy", logits, empty, "masked_lm", num_items=7)
    assert part.item() == 0.0
    part.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))
    assert math.isnan(compute_loss("cross_entropy", logits, empty, "masked_lm").item())


def test_uncertainty_learns_from_its_own_unscaled_gradient() -> None:
    """combine() accumulates d/ds (exp(-s) w L + s) into log_vars.grad itself; the loss it
    returns carries no gradient to log_vars (so a loss scale never reaches it)."""
    bal = Balancer("uncertainty", [1.0, 2.0], 0.1)
    with torch.no_grad():
        bal.log_vars.copy_(torch.tensor([0.3, -0.2]))
    x = torch.tensor([1.5, 0.7], requires_grad=True)
    # two micro-batches, each half of both tasks' step loss
    for _ in range(2):
        out = bal.combine({0: x[0] / 2, 1: x[1] / 2}, {0: 0.5, 1: 0.5}, {0: 0.5, 1: 0.5})
        (out * 65536.0).backward()  # as a loss scaler would
    s, w = torch.tensor([0.3, -0.2]), torch.tensor([1.0, 2.0])
    expected = 1 - torch.exp(-s) * w * x.detach()
    assert bal.log_vars.grad is not None
    torch.testing.assert_close(bal.log_vars.grad, expected)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, 65536.0 * torch.exp(-s) * w)
    bal.zero_grad()
    assert bal.log_vars.grad is None


def test_famo_gradient_is_the_papers_on_the_step_loss() -> None:
    """FAMO's update direction sum_i z_i/(c L_i) grad L_i, with c = sum_i z_i / L_i."""
    bal = Balancer("famo", [1.0, 1.0], 0.1)
    with torch.no_grad():
        bal.xi.copy_(torch.tensor([0.4, -0.1]))
    x = torch.tensor([2.0, 0.5], requires_grad=True)
    bal.combine({0: x[0], 1: x[1]}, {0: 0.5, 1: 0.5}).backward()
    z = F.softmax(torch.tensor([0.4, -0.1]), dim=0)
    d = x.detach() + 1e-8
    assert x.grad is not None
    torch.testing.assert_close(x.grad, z / d / (z / d).sum())
    assert bal.xi.grad is None  # xi learns in famo_update only


def test_famo_remembers_each_tasks_step_mean() -> None:
    bal = Balancer("famo", [1.0, 1.0], 0.1)
    bal.famo_update({}, {0: 1.25, 1: 0.5})
    assert bal.prev == {0: 1.25, 1: 0.5}
    bal.famo_update(dict(bal.prev), {0: 1.0, 1: 0.5})
    assert bal.prev == {0: 1.0, 1: 0.5}
    # FAMO favours the task whose loss fell less (task 1 here)
    assert bal.xi.detach()[1] > bal.xi.detach()[0]
