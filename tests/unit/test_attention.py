"""bitblend's CPU attention kernel and dropout masks (models/attention.py): the same
function as PyTorch's SDPA, unbiased masks at the asked rate, exact dropout semantics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from bitblend.models import attention
from bitblend.models.backbones import load_backbone
from bitblend.taskspec import load_data
from bitblend.train.setup import build_model
from tests.conftest import make_recipe


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_drops_at_the_asked_rate_in_every_slice(p: float) -> None:
    """Each 64-bit draw feeds four elements; every one of the four 16-bit slices must be
    unbiased (the default random_() range leaves the top bit 0, which would skew one)."""
    torch.manual_seed(0)
    n = 1 << 20
    mask, rate = attention.keep_mask((n,), p, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (n,)
    assert rate == round(p * 65536) / 65536 and abs(rate - p) < 1e-5
    tol = 5 * math.sqrt(p * (1 - p) / (n / 4))  # 5 sigma per slice
    for k in range(4):
        dropped = 1.0 - mask[k::4].float().mean().item()
        assert abs(dropped - p) < tol, (k, dropped)


def test_keep_mask_follows_the_seed() -> None:
    cpu = torch.device("cpu")
    torch.manual_seed(3)
    a, _ = attention.keep_mask((7, 5, 3), 0.3, cpu)
    torch.manual_seed(3)
    b, _ = attention.keep_mask((7, 5, 3), 0.3, cpu)
    assert torch.equal(a, b) and a.shape == (7, 5, 3)


def test_dropout_is_inverted_dropout_with_its_mask() -> None:
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(1)
    out = attention.dropout(x, 0.25)
    torch.manual_seed(1)
    mask, rate = attention.keep_mask(x.shape, 0.25, x.device)
    expected = torch.where(mask, x / (1 - rate), 0.0)
    torch.testing.assert_close(out, expected)
    out.backward(torch.ones_like(out))
    assert x.grad is not None
    torch.testing.assert_close(x.grad, mask.float() / (1 - rate))
    # eval, p=0: identity
    assert attention.dropout(x, 0.25, training=False) is x
    assert attention.dropout(x, 0.0) is x


def test_dropout_keeps_the_expectation() -> None:
    torch.manual_seed(0)
    out = attention.dropout(torch.ones(1 << 20, dtype=torch.bfloat16), 0.1)
    assert out.dtype == torch.bfloat16
    assert out.float().mean().item() == pytest.approx(1.0, abs=3e-3)


def test_use_fast_dropout_swaps_every_plain_dropout() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.Sequential(nn.Dropout(0.3)))
    model.eval()
    assert attention.use_fast_dropout(model) == 2
    kinds = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert all(type(m) is attention.Dropout for m in kinds)
    assert [m.p for m in kinds] == [0.2, 0.3] and not any(m.training for m in kinds)


@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_built_model_uses_the_asked_kernels(kernels: str) -> None:
    recipe = make_recipe("model.backbone=tiny-bert", f"model.kernels={kernels}")
    model, _, _ = build_model(recipe, load_data(recipe))
    drops = [type(m) for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(
        t is (attention.Dropout if kernels == "auto" else nn.Dropout) for t in drops
    )
    impl = model.backbone.config._attn_implementation
    assert impl == (attention.NAME if kernels == "auto" else "sdpa")


def _pair(name: str) -> tuple[nn.Module, nn.Module, object]:
    torch.manual_seed(0)
    ours, tok = load_backbone(name, kernels="auto")
    theirs, _ = load_backbone(name, kernels="torch")
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs, tok


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt"])
def test_same_outputs_and_gradients_as_sdpa(name: str) -> None:
    """fp32, no dropout, padded batch: bitblend's kernel computes SDPA's function."""
    ours, theirs, tok = _pair(name)
    enc = tok(  # type: ignore[operator]
        ["a longer sentence that needs no padding at all", "short"],
        padding=True,
        return_tensors="pt",
    )
    keep = enc["attention_mask"].bool()
    outs, grads = [], []
    for model in (ours, theirs):
        model.train()
        model.config.attention_probs_dropout_prob = 0.0
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        out = model(**enc).last_hidden_state
        out[keep].square().sum().backward()
        outs.append(out[keep])
        grads.append(
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        )
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    # fp32 sums in another order: compare the gradient vectors as a whole
    assert (grads[0] - grads[1]).norm() <= 1e-5 * grads[1].norm()


def test_attention_dropout_is_exact() -> None:
    """With dropout: softmax(q k^T s) masked by keep_mask, scaled, times v."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, 4) for _ in range(3))
    module = nn.Module()
    module.is_causal = False  # type: ignore[assignment]  # (without it: causal, as transformers)
    torch.manual_seed(5)
    out, _ = attention.attention_forward(module, q, k, v, None, dropout=0.4, scaling=0.5)
    torch.manual_seed(5)
    mask, rate = attention.keep_mask((2, 3, 8, 8), 0.4, q.device)
    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1)
    expected = (torch.where(mask, probs, 0.0) / (1 - rate)) @ v
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_causal_and_boolean_masks() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    causal = nn.Module()
    causal.is_causal = True  # type: ignore[assignment]
    out, _ = attention.attention_forward(causal, q, k, v, None)
    ref = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref.transpose(1, 2))
    keys = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    keys[1, :, :, 4:] = False  # the second example's last two tokens are padding
    out, _ = attention.attention_forward(nn.Module(), q, k, v, keys)
    ref = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keys)
    torch.testing.assert_close(out, ref.transpose(1, 2))


FAMILIES = {
    "distilbert": {"dim": 32, "n_layers": 1, "n_heads": 2, "hidden_dim": 64},
    "roberta": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                "intermediate_size": 64},
    "electra": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                "intermediate_size": 64, "embedding_size": 32},
    # grouped KV heads: bitblend's function hands these to SDPA
    "llama": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 64},
}  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_local_directories_of_other_families_match_sdpa(family: str, tmp_path: Path) -> None:
    """A transformers directory of another family loads with bitblend's attention and
    computes what SDPA computes (fp32, eval, a padded batch)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from bitblend.models.backbones import minilm_path

    config = AutoConfig.for_model(family, vocab_size=100, **FAMILIES[family])
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp_path)
    ours, _ = load_backbone(str(tmp_path), kernels="auto")
    theirs, _ = load_backbone(str(tmp_path), kernels="torch")
    assert ours.config._attn_implementation == attention.NAME
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        a = ours.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        b = theirs.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("dropout", "attention_dropout", "expected"),
    [(None, None, (0.2, 0.3)), (0.0, None, (0.0, 0.0)), (None, 0.0, (0.2, 0.0)),
     (0.5, 0.1, (0.5, 0.1))],
)  # fmt: skip
def test_resolve_dropouts(
    dropout: float | None, attention_dropout: float | None, expected: tuple[float, float]
) -> None:
    """model.dropout sets both, then model.attention_dropout the attention one; 0.0 is a
    value, not 'unset'."""
    assert attention.resolve_dropouts(0.2, 0.3, dropout, attention_dropout) == expected
    assert attention.resolve_dropouts(None, None, None, None) == (None, None)


# -- edge cases (issue 14, item 5): transformers' SDPA function is the reference --------


def _sdpa(module: nn.Module, *args: object, **kw: object) -> torch.Tensor:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, *args, **kw)[0]  # type: ignore[arg-type]


def _qkv(dtype: torch.dtype = torch.float32, s: int = 6) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    return tuple((torch.randn(2, 2, s, 4) * 3).to(dtype) for _ in range(3))


def test_module_without_is_causal_is_causal_as_in_transformers() -> None:
    """No `is_causal` attribute, no mask: transformers' SDPA path attends causally."""
    q, k, v = _qkv()
    bare = nn.Module()
    out, _ = attention.attention_forward(bare, q, k, v, None)
    torch.testing.assert_close(out, _sdpa(bare, q, k, v, None))
    ref = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref.transpose(1, 2))
    # an explicit is_causal argument wins over the module's attribute, both ways
    enc = nn.Module()
    enc.is_causal = False  # type: ignore[assignment]
    for module, flag in ((enc, True), (bare, False)):
        out, _ = attention.attention_forward(module, q, k, v, None, is_causal=flag)
        torch.testing.assert_close(out, _sdpa(module, q, k, v, None, is_causal=flag))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fill", ["fp32-lowest", "-inf", "-1e9"])
def test_float_mask_rows_fully_masked_match_sdpa(dtype: torch.dtype, fill: str) -> None:
    """A float mask in fp32 (as users and older models build it) with one query row fully
    masked, applied to low-precision q/k/v: no NaN, and SDPA's output on every row (zeros
    where a row is all -inf; the other rows within the compute dtype's rounding)."""
    value = {"fp32-lowest": torch.finfo(torch.float32).min, "-inf": -math.inf, "-1e9": -1e9}
    q, k, v = _qkv(dtype)
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, :, 2, :] = value[fill]  # query 2 of example 0 sees nothing
    mask[1, :, :, 4:] = value[fill]  # example 1: the last two keys are padding
    module = nn.Module()
    module.is_causal = False  # type: ignore[assignment]
    out, _ = attention.attention_forward(module, q, k, v, mask)
    assert torch.isfinite(out).all()
    ref = _sdpa(module, q, k, v, mask)  # SDPA takes the fp32 mask with low-precision q/k/v
    assert ref.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=0.02, rtol=0.02)
    if fill == "-inf":
        assert torch.equal(out[0, 2], torch.zeros_like(out[0, 2]))
    # gradients stay finite too (a NaN row would poison every parameter's gradient)
    qq = q.clone().requires_grad_()
    attention.attention_forward(module, qq, k, v, mask)[0].float().sum().backward()
    assert qq.grad is not None and torch.isfinite(qq.grad).all()


def test_fp16_boolean_mask_with_a_dead_row_stays_finite() -> None:
    """fp16 scores of -20 plus fp16's lowest value overflow to -inf; with every key of a row
    masked that row (and every gradient) would be NaN."""
    q, k, v = _qkv(torch.float16)
    k = k.abs()
    q[0, :, 3] = -10.0  # every score of that query below -16
    keys = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    keys[0, :, 3, :] = False
    keys[1, :, :, 5:] = False
    module = nn.Module()
    module.is_causal = False  # type: ignore[assignment]
    qq = q.clone().requires_grad_()
    out, _ = attention.attention_forward(module, qq, k, v, keys)
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert qq.grad is not None and torch.isfinite(qq.grad).all()
    live = torch.ones(2, 6, dtype=torch.bool)
    live[0, 3] = False
    ref = _sdpa(module, q.float(), k.float(), v.float(), keys)
    torch.testing.assert_close(out.float()[live], ref[live], atol=0.02, rtol=0.02)


@pytest.mark.parametrize("p", [1e-6, 2.0**-17, 1 - 2.0**-17, 1 - 1e-6, 1.0])
def test_dropout_rates_off_the_grid_are_exact_torch(p: float) -> None:
    """Rates the 1/65536 grid would round to 0 or 1 (no dropout, or a ZeroDivisionError)
    run torch's own dropout / SDPA, draw for draw."""
    assert not attention.on_grid(p)
    with pytest.raises(ValueError, match="rounds to"):
        attention.keep_mask((4, 4), p, torch.device("cpu"))
    x = torch.randn(64, 64)
    torch.manual_seed(7)
    ours = attention.dropout(x, p)
    torch.manual_seed(7)
    assert torch.equal(ours, nn.functional.dropout(x, p, True))
    q, k, v = _qkv()
    module = nn.Module()
    module.is_causal = False  # type: ignore[assignment]
    torch.manual_seed(7)
    out, _ = attention.attention_forward(module, q, k, v, None, dropout=p)
    torch.manual_seed(7)
    assert torch.equal(out, _sdpa(module, q, k, v, None, dropout=p))


@pytest.mark.parametrize("p", [2.0**-16, 0.5, 1 - 2.0**-16])
def test_dropout_rates_on_the_grid_use_the_cheap_mask(p: float) -> None:
    assert attention.on_grid(p)
    _, rate = attention.keep_mask((8,), p, torch.device("cpu"))
    assert 0 < rate < 1 and abs(rate - p) <= 2.0**-17
