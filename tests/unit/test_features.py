"""models/features.py: the numerical feature embeddings (tasks[i].feature_embedding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitblend.models.features import (
    FeatureTokenizer,
    PeriodicFeatures,
    PiecewiseLinearFeatures,
    feature_embedding,
    quantile_edges,
)


def test_quantile_edges_increase_and_pad_few_valued_features() -> None:
    rng = np.random.default_rng(0)
    x = np.stack(
        [rng.normal(size=200), (rng.random(200) > 0.5).astype(float), np.full(200, 3.0)], axis=1
    )
    x[5, 0] = np.nan  # a missing value is ignored, not a quantile
    edges = quantile_edges(x, bins=8)
    assert [len(e) for e in edges] == [9, 9, 9]  # one (F, T + 1) table
    assert all(np.all(np.diff(e) > 0) for e in edges)
    assert edges[0][0] == pytest.approx(np.nanmin(x[:, 0]))
    assert edges[0][-1] == pytest.approx(np.nanmax(x[:, 0]))
    # binary flag: its two values, then bins above its maximum no training row reaches
    assert edges[1][:3] == [0.0, 1.0, 2.0]
    assert edges[2][:2] == [2.5, 3.5]  # a constant feature: one bin around it


def test_piecewise_encoding_is_the_bin_fractions() -> None:
    emb = PiecewiseLinearFeatures([[0.0, 1.0, 3.0, 4.0]], width=4)
    lower, span = emb.lower, emb.span
    x = torch.tensor([[-1.0], [0.5], [2.0], [9.0]])  # (batch 4, 1 feature)
    enc = ((x.unsqueeze(-1) - lower) / span).clamp(0, 1)[:, 0]
    want = [[0, 0, 0], [0.5, 0, 0], [1, 0.5, 0], [1, 1, 1]]
    assert torch.equal(enc, torch.tensor(want, dtype=torch.float32))
    assert emb(x).shape == (4, 1, 4)
    # The edges are neither trained nor cast: a bf16 model keeps them exact in fp32.
    assert set(emb.state_dict()) == {"linear.weight", "linear.bias"}
    emb.to(torch.bfloat16)
    assert emb.lower.dtype == torch.float32 and torch.equal(emb.lower[0], torch.tensor([0, 1, 3.0]))


def test_periodic_and_factory_shapes() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    assert PeriodicFeatures(3, 8, k=4)(x).shape == (5, 3, 8)
    assert isinstance(feature_embedding("linear", 3, 8, []), FeatureTokenizer)
    assert isinstance(feature_embedding("periodic", 3, 8, []), PeriodicFeatures)
    edges = quantile_edges(x.numpy(), bins=4)
    assert isinstance(feature_embedding("piecewise", 3, 8, edges), PiecewiseLinearFeatures)


def test_encodings_keep_magnitude_through_layer_norm() -> None:
    """Why linear is not enough: behind the backbone's embedding LayerNorm, x * W + b for
    x = 4 and x = 8 are nearly the same token; the piecewise encoding keeps them apart."""
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(64, elementwise_affine=False)
    x = torch.tensor([[4.0], [8.0]])
    lin = ln(FeatureTokenizer(1, 64)(x)[:, 0])
    edges = [[-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 9.0]]
    pw = ln(PiecewiseLinearFeatures(edges, 64)(x)[:, 0])
    cos = torch.nn.functional.cosine_similarity
    assert cos(lin[0], lin[1], dim=0) > 0.95
    assert cos(pw[0], pw[1], dim=0) < cos(lin[0], lin[1], dim=0) - 0.05


@pytest.mark.parametrize("kind", ["linear", "periodic", "piecewise"])
def test_cost_model_counts_the_feature_embedding(kind: str) -> None:
    """estimate's adapter parameter count (and its fp32 share) equals the built model's."""
    from bitblend.estimate.shapes import head_params
    from bitblend.models.backbones import load_backbone_with_head
    from bitblend.models.trunk import HeadSpec, MultiTaskModel

    backbone = load_backbone_with_head("tiny-bert", None, 0.0, 0.0, "torch")[0]
    x = np.random.default_rng(0).normal(size=(50, 5))
    spec = HeadSpec("t", "binary", 1, modalities=["tabular"], num_features=5)
    spec.feature_embedding, spec.tabular_bins = kind, quantile_edges(x)
    model = MultiTaskModel(backbone, [spec])
    params = dict(model.named_parameters())
    built = sum(p.numel() for n, p in params.items() if not n.startswith("backbone."))
    tab = sum(p.numel() for n, p in params.items() if n.startswith("adapters.t.tabular."))
    total, fp32, _ = head_params([spec], backbone.config.hidden_size)
    assert total == built
    head = sum(p.numel() for n, p in params.items() if n.startswith("heads."))
    assert fp32 == head + (0 if kind == "linear" else tab)
    assert ("adapters.t.tabular" in model.fp32_module_names) == (kind != "linear")


def test_unknown_feature_embedding_is_one_line_error() -> None:
    from bitblend.config.load import recipe_from_dict
    from bitblend.errors import BitblendError

    task = {"name": "c", "data": "breast_cancer", "head": "binary", "feature_embedding": "ple"}
    with pytest.raises(BitblendError, match=r"tasks\[0\]\.feature_embedding: expected one of"):
        recipe_from_dict({"name": "x", "tasks": [task]})
