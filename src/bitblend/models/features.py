"""Embeddings of numerical (tabular) features: one token per feature, (B, F) -> (B, F, H).

Three kinds, after Gorishniy et al., "On Embeddings for Numerical Features in Tabular Deep
Learning" (NeurIPS 2022), chosen by `tasks[i].feature_embedding`:

- linear: x_f * W_f + b_f (FT-Transformer's feature tokenizer).
- periodic: [sin(2 pi c_f x_f), cos(2 pi c_f x_f)] with K trainable frequencies c_f per
  feature, then a per-feature Linear(2K -> H) and ReLU (their PLR embedding).
- piecewise: piecewise-linear encoding over T bins whose edges are quantiles of the
  training split (PLE), then a per-feature Linear(T -> H) and ReLU.

Why more than linear: the backbone's embedding LayerNorm (BERT and its kin normalise
inputs_embeds + position + type) keeps a token's direction and drops its scale. x * W_f
only moves along one direction, so past |x| ~ |b_f + position| / |W_f| the trunk sees
+-W_f and nothing of how large x is. The periodic and piecewise encodings map x to a
direction that keeps turning with x, which survives the normalisation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

FEATURE_EMBEDDINGS = ("linear", "periodic", "piecewise")
PERIODIC_FREQUENCIES = 16  # K: sin and cos of K frequencies per feature
# frequencies ~ N(0, sigma) on standardised features (inside the paper's search range)
PERIODIC_SIGMA = 0.1
PIECEWISE_BINS = 16  # T: bins per feature (fewer for features with fewer distinct values)


class FeatureTokenizer(nn.Module):
    """Tabular features -> one token each: x_f * W_f + b_f (FT-Transformer). (B,F)->(B,F,H)."""

    def __init__(self, num_features: int, width: int) -> None:
        super().__init__()
        bound = width**-0.5
        self.weight = nn.Parameter(torch.empty(num_features, width).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_features, width).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, features) standardised values -> (batch, features, width)."""
        return x.unsqueeze(-1).to(self.weight.dtype) * self.weight + self.bias


class _PerFeatureLinear(nn.Module):
    """A separate Linear(d -> H) per feature: (B, F, d) -> (B, F, H)."""

    def __init__(self, num_features: int, d: int, width: int) -> None:
        super().__init__()
        bound = d**-0.5  # nn.Linear's default init range
        self.weight = nn.Parameter(torch.empty(num_features, d, width).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_features, width).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, features, d) -> (batch, features, width)."""
        return torch.einsum("bfd,fdh->bfh", x.to(self.weight.dtype), self.weight) + self.bias


class PeriodicFeatures(nn.Module):
    """PLR: sin/cos of K trainable frequencies per feature, per-feature Linear, ReLU."""

    def __init__(self, num_features: int, width: int, k: int = PERIODIC_FREQUENCIES) -> None:
        super().__init__()
        self.frequencies = nn.Parameter(torch.randn(num_features, k) * PERIODIC_SIGMA)
        self.linear = _PerFeatureLinear(num_features, 2 * k, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, features) standardised values -> (batch, features, width)."""
        # (B, F, 1) * (F, K) -> (B, F, K) angles
        v = 2 * math.pi * x.unsqueeze(-1).to(self.frequencies.dtype) * self.frequencies
        return torch.relu(self.linear(torch.cat([torch.sin(v), torch.cos(v)], dim=-1)))


def quantile_edges(x: np.ndarray, bins: int = PIECEWISE_BINS) -> list[list[float]]:
    """Per-feature bin edges (F lists of bins + 1 increasing values) from the training
    split's quantiles, NaN ignored. A feature with fewer distinct quantiles (a binary
    flag: 2) gets its distinct ones, then edges 1 apart above its maximum, bins no
    training value reaches (all features need the same T for one (F, T) tensor)."""
    edges = []
    for col in x.T:
        col = col[~np.isnan(col)]
        q = np.unique(np.quantile(col, np.linspace(0, 1, bins + 1))) if col.size else np.zeros(1)
        if q.size == 1:  # constant feature: one bin of width 1 around it
            q = np.array([q[0] - 0.5, q[0] + 0.5])
        pad = q[-1] + np.arange(1, bins + 2 - q.size)
        edges.append([float(v) for v in np.concatenate([q, pad])])
    return edges


class PiecewiseLinearFeatures(nn.Module):
    """PLE: x -> (B, F, T) with bin t's entry (x - e_t) / (e_{t+1} - e_t) clipped to [0, 1]
    (1 for bins below x, 0 above, the fraction inside x's own bin), per-feature Linear, ReLU.
    Every bin is clipped, so values beyond the training range saturate."""

    def __init__(self, edges: list[list[float]], width: int) -> None:
        super().__init__()
        e = torch.tensor(edges, dtype=torch.float32)  # (F, T + 1)
        # Plain fp32 tensors, neither parameters nor buffers: fixed by the training split
        # and rebuilt from HeadSpec.tabular_bins (saved in bitblend.json). A buffer would
        # go through bf16 when bf16-true casts the model (even for modules it then keeps in
        # fp32: model.to(bf16) runs first), rounding the edges to 3 significant digits.
        self.lower = e[:, :-1].contiguous()  # (F, T)
        self.span = (e[:, 1:] - e[:, :-1]).contiguous()  # (F, T), > 0
        self.linear = _PerFeatureLinear(e.shape[0], e.shape[1] - 1, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, features) standardised values -> (batch, features, width)."""
        lower, span = self.lower.to(x.device), self.span.to(x.device)  # no-op on CPU
        enc = ((x.unsqueeze(-1).float() - lower) / span).clamp(0.0, 1.0)  # (B, F, T)
        return torch.relu(self.linear(enc))


def feature_embedding(
    kind: str, num_features: int, width: int, edges: list[list[float]]
) -> nn.Module:
    """The tabular adapter of one task."""
    if kind == "periodic":
        return PeriodicFeatures(num_features, width)
    if kind == "piecewise":
        return PiecewiseLinearFeatures(edges, width)
    return FeatureTokenizer(num_features, width)
