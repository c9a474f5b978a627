"""UPGrad and PCGrad (torchjd, via train/jacobian.py) against their closed forms.

For two task gradients g1, g2 that conflict (g1.g2 < 0), PCGrad projects each onto the
normal plane of the other and sums: g1 - (g1.g2/|g2|^2) g2 + g2 - (g1.g2/|g1|^2) g1.
UPGrad projects each onto the dual cone {x: g1.x >= 0, g2.x >= 0}, which for two rows is
the same projection; bitblend weighs UPGrad's projections with a preference vector of ones,
so it sums them as PCGrad does (train/jacobian.py says why). Without conflict both leave the
gradients as they are: g1 + g2.
"""

from __future__ import annotations

import pytest
import torch

from bitblend.train.jacobian import make_aggregator

pytest.importorskip("torchjd")


def _project(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a without its component against b (unchanged when a and b do not conflict)."""
    dot = a @ b
    return a - dot / (b @ b) * b if dot < 0 else a


G1 = torch.tensor([1.0, 0.0, 2.0, -1.0], dtype=torch.float64)
G2 = torch.tensor([-1.0, 1.0, -0.5, 0.0], dtype=torch.float64)  # G1 . G2 = -2


def _aggregate(name: str, jac: torch.Tensor) -> torch.Tensor:
    return make_aggregator(name)(jac.shape[0])(jac)


def test_pcgrad_equals_its_closed_form_on_conflicting_gradients() -> None:
    assert G1 @ G2 < 0
    want = _project(G1, G2) + _project(G2, G1)
    torch.testing.assert_close(_aggregate("pcgrad", torch.stack([G1, G2])), want)


def test_upgrad_equals_its_closed_form_on_conflicting_gradients() -> None:
    want = _project(G1, G2) + _project(G2, G1)
    got = _aggregate("upgrad", torch.stack([G1, G2]))
    # The quadratic-program solver is exact to about 1e-4.
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_without_conflict_both_sum() -> None:
    g2 = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)  # G1 . g2 = 1 > 0
    jac = torch.stack([G1, g2])
    torch.testing.assert_close(_aggregate("pcgrad", jac), G1 + g2)
    torch.testing.assert_close(_aggregate("upgrad", jac), G1 + g2, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["upgrad", "pcgrad"])
def test_aggregate_conflicts_with_no_task_on_random_pairs(name: str) -> None:
    """The property both exist for: the update never points against a task's gradient."""
    gen = torch.Generator().manual_seed(0)
    agg = make_aggregator(name)(2)
    for _ in range(20):
        jac = torch.randn(2, 16, generator=gen, dtype=torch.float64)
        out = agg(jac)
        assert (jac @ out >= -1e-3 * jac.norm(dim=1) * out.norm()).all()
