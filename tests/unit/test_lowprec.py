"""Low precision in depth: low-bit optimizer states, bf16 rounding, fp8 emulation, rules."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from bitblend.config.schema import OptimizerConfig, PrecisionConfig
from bitblend.errors import BitblendError
from bitblend.optim.build import build_optimizer, param_roles
from bitblend.optim.lowbit import export_state, import_state, state_bytes
from bitblend.precision.fp8 import E4M3, E5M2, Fp8EmulatedLinear, quantize_dequantize
from bitblend.precision.health import LossScaleStuck, StepHealth
from bitblend.precision.recipes import build_precision
from bitblend.precision.rounding import stochastic_round_

CPU = torch.device("cpu")


def _mlp(seed: int = 0) -> nn.Sequential:
    # 64x128 = 8192 weights: above the 4096-element floor under which states stay 32-bit.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 2))


def _data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 64, generator=g)
    y = (x[:, :8].sum(1) > 0).long()
    return x, y


def _train(opt_cfg: OptimizerConfig, bits: int, steps: int = 60) -> tuple[list[float], int]:
    model = _mlp()
    opt = build_optimizer(list(model.parameters()), opt_cfg, state_bits=bits)
    x, y = _data()
    losses = []
    for s in range(steps):
        idx = slice((s * 32) % 256, (s * 32) % 256 + 32)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, state_bytes(opt)


@pytest.mark.slow
def test_8bit_adamw_tracks_fp32_and_uses_a_quarter_of_the_state() -> None:
    """bitsandbytes 8-bit AdamW: loss curve close to fp32 AdamW, states ~4x smaller."""
    cfg = OptimizerConfig(name="adamw", lr=3e-3)
    l32, b32 = _train(cfg, 32)
    l8, b8 = _train(cfg, 8)
    diffs = [abs(a - b) for a, b in zip(l32, l8, strict=True)]
    assert max(diffs) < 0.05, max(diffs)
    assert l8[-1] < 0.5 * l8[0]  # it learns
    # fp32: 2 moments x 4 B x 8,578 params. 8-bit: 1 B codes for the 8,192-weight matrix,
    # 32-bit states for the small bias/second layer, plus per-block scales.
    assert b32 == 2 * 4 * sum(p.numel() for p in _mlp().parameters()) + 4 * 4  # + step counters
    assert b8 < 0.4 * b32, (b8, b32)


VARIANTS = [
    ("adamw", 32, {}),
    ("adam", 32, {}),
    ("rmsprop", 32, {"momentum": 0.9}),
    ("sgd", 32, {"momentum": 0.9}),
    ("adamw", 8, {}),
    ("adam", 8, {}),
    ("rmsprop", 8, {}),
    ("sgd", 8, {"momentum": 0.9}),
    pytest.param("adamw", 4, {}, marks=pytest.mark.slow),  # torchao compiles its step
]


@pytest.mark.parametrize(("name", "bits", "extra"), VARIANTS)
def test_optimizer_state_round_trip(name: str, bits: int, extra: dict) -> None:
    """export_state -> checkpoint flattening -> import_state continues bit for bit."""
    from bitblend.train.checkpoint import _flatten, _unflatten

    cfg = OptimizerConfig(name=name, lr=1e-2, **extra)
    x, y = _data()

    def step(model: nn.Module, opt: torch.optim.Optimizer, s: int) -> None:
        idx = slice(s * 32, s * 32 + 32)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()

    a = _mlp()
    opt_a = build_optimizer(list(a.parameters()), cfg, state_bits=bits)
    for s in range(3):
        step(a, opt_a, s)
    tensors: dict[str, torch.Tensor] = {}
    meta = _flatten(export_state(opt_a), "s", tensors)  # what a checkpoint stores
    b = _mlp()
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(list(b.parameters()), cfg, state_bits=bits)
    import_state(opt_b, _unflatten(meta, tensors))
    for s in range(3, 6):
        step(a, opt_a, s)
        step(b, opt_b, s)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_4bit_states_need_adam_and_stateless_sgd_warns() -> None:
    p = [nn.Parameter(torch.zeros(4))]
    with pytest.raises(BitblendError, match="4-bit states exist for adam and adamw only"):
        build_optimizer(p, OptimizerConfig(name="sgd", momentum=0.9), state_bits=4)
    with pytest.warns(UserWarning, match="keeps no optimizer state"):
        opt = build_optimizer(p, OptimizerConfig(name="sgd"), state_bits=8)
    assert type(opt) is torch.optim.SGD


# -- bf16 rounding -------------------------------------------------------------------------
class _One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1000))


@pytest.mark.parametrize(("rounding", "moves"), [("nearest", False), ("stochastic", True),
                                                 ("kahan", True)])  # fmt: skip
def test_sub_ulp_updates_move_only_with_sr_or_kahan(rounding: str, moves: bool) -> None:
    """A bf16 weight of 1.0 (ulp 2^-7 ~ 0.0078) fed 100 updates of -0.001: round-to-nearest
    drops every one; stochastic rounding and Kahan compensation add up to ~0.9."""
    cfg = PrecisionConfig(recipe="bf16-true", master_weights=False, rounding=rounding)
    prec = build_precision(cfg, CPU, seed=3)
    model = prec.convert_module(_One())
    assert model.w.dtype == torch.bfloat16
    roles = param_roles(model)  # from the model: the stand-ins are empty between steps
    opt = build_optimizer(
        prec.optimizer_parameters(model),
        OptimizerConfig(name="sgd", lr=1.0, weight_decay=0.0),
        roles,
    )
    for _ in range(100):
        model.w.grad = torch.full_like(model.w, 1e-3)
        assert prec.optimizer_step(opt, None).stepped
        opt.zero_grad()
    mean = float(model.w.float().mean())
    if moves:
        assert mean == pytest.approx(0.9, abs=0.01)
    else:
        assert mean == 1.0
    # Between steps the transient fp32 copy holds no memory.
    assert all(p.numel() == 0 for g in opt.param_groups for p in g["params"])


def test_stochastic_rounding_is_unbiased_and_stays_on_neighbours() -> None:
    x = torch.full((100_000,), 1.0 + 2**-9)  # a quarter of the way from 1 to 1 + 2^-7
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_(out, x, torch.Generator().manual_seed(0))
    values = set(out.float().unique().tolist())
    assert values == {1.0, 1.0 + 2**-7}
    assert float(out.float().mean()) == pytest.approx(
        1.0 + 2**-9, abs=6e-5
    )  # 5 sigma of a 100k-sample mean


def test_rounding_needs_pure_bf16() -> None:
    with pytest.raises(
        BitblendError, match=r"precision\.rounding stochastic: applies to bf16-true"
    ):
        build_precision(PrecisionConfig(recipe="bf16-mixed", rounding="stochastic"), CPU)


def test_16bit_states_are_bf16_between_steps_and_track_fp32() -> None:
    """state_bits 16: AdamW moments stored in bf16 at rest; weights follow fp32 closely."""
    runs = {}
    for bits in (32, 16):
        prec = build_precision(PrecisionConfig(recipe="32-true", state_bits=bits), CPU)
        model = prec.convert_module(_mlp())
        opt = build_optimizer(prec.optimizer_parameters(model), OptimizerConfig(lr=1e-2))
        x, y = _data()
        for s in range(5):
            nn.functional.cross_entropy(
                model(x[s * 32 : s * 32 + 32]), y[s * 32 : s * 32 + 32]
            ).backward()
            prec.optimizer_step(opt, None)
            opt.zero_grad()
        runs[bits] = (model, opt)
    states = runs[16][1].state[runs[16][0][0].weight]
    assert states["exp_avg"].dtype == states["exp_avg_sq"].dtype == torch.bfloat16
    assert state_bytes(runs[16][1]) < 0.55 * state_bytes(runs[32][1])
    for p16, p32 in zip(runs[16][0].parameters(), runs[32][0].parameters(), strict=True):
        torch.testing.assert_close(p16, p32, atol=2e-3, rtol=0)


# -- fp8 ------------------------------------------------------------------------------------
def _sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.float(), test.float()
    return 10 * math.log10(float(ref.pow(2).sum()) / float((ref - test).pow(2).sum()))


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_fp8_emulated_linear_sqnr_at_least_20db(scaling: str) -> None:
    """Forward output and both input/weight gradients within 20 dB SQNR of bf16."""
    torch.manual_seed(0)
    ref = nn.Linear(256, 128)
    emu = nn.Linear(256, 128)
    emu.load_state_dict(ref.state_dict())
    emu.__class__ = Fp8EmulatedLinear
    emu.fp8_scaling = scaling
    x = torch.randn(4, 32, 256) * torch.logspace(-2, 1, 256)  # channels of varied magnitude
    xr, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(4, 32, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yr, ye = ref(xr), emu(xe)
    yr.backward(g)
    ye.backward(g)
    assert ye.dtype == torch.bfloat16
    assert not torch.equal(yr, ye)  # really quantised
    assert _sqnr_db(yr, ye) >= 20
    assert _sqnr_db(xr.grad, xe.grad) >= 20
    assert _sqnr_db(ref.weight.grad, emu.weight.grad) >= 20
    torch.testing.assert_close(ref.bias.grad, emu.bias.grad, rtol=1e-2, atol=1e-2)


def test_fp8_quantisation_clamps_instead_of_trusting_the_cast() -> None:
    x = torch.tensor([1.0, -3.0, 1e6, float("inf")])
    # amax is inf here: the scale goes to 0, values clamp; nothing becomes nan silently
    q = quantize_dequantize(torch.tensor([1.0, -3.0, 1000.0]), E4M3, "tensorwise")
    assert float(q.abs().max()) == pytest.approx(1000.0, rel=0.07)
    g = quantize_dequantize(torch.tensor([1e-3, 5e4, -7e4]), E5M2, "tensorwise")
    assert torch.isfinite(g).all()
    assert x.numel() == 4


def test_fp8_on_cpu_fails_naming_the_emulated_recipe() -> None:
    with pytest.raises(BitblendError, match="fp8-emulated"):
        build_precision(PrecisionConfig(recipe="fp8"), CPU)


def test_fp8_emulated_keeps_heads_adapters_and_kept_layers_high_precision() -> None:
    from bitblend.models.backbones import load_backbone
    from bitblend.models.trunk import HeadSpec, MultiTaskModel

    torch.manual_seed(0)
    backbone, _ = load_backbone("tiny-bert")
    model = MultiTaskModel(backbone, [HeadSpec("t", "classification", 3, ["a", "b", "c"])])
    cfg = PrecisionConfig(recipe="fp8-emulated", keep_fp32=["backbone.encoder.layer.0.*"])
    prec = build_precision(cfg, CPU)
    prec.convert_module(model)
    converted = {n for n, m in model.named_modules() if isinstance(m, Fp8EmulatedLinear)}
    assert any(n.startswith("backbone.encoder.layer.1.") for n in converted)
    assert not any(n.startswith(("heads.", "backbone.encoder.layer.0.")) for n in converted)
    assert "backbone.encoder.layer.0" in prec.fp32_modules or any(
        n.startswith("backbone.encoder.layer.0") for n in prec.fp32_modules
    )
    ids = torch.randint(1000, 2000, (2, 16))
    with prec.forward_context():
        logits = model("t", ids, torch.ones_like(ids))
    logits.sum().backward()
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_keep_fp32_pattern_matching_nothing_is_an_error() -> None:
    cfg = PrecisionConfig(recipe="bf16-mixed", keep_fp32=["backbone.encoder.layer.0.*", "nope*"])
    prec = build_precision(cfg, CPU)
    from bitblend.models.backbones import load_backbone
    from bitblend.models.trunk import HeadSpec, MultiTaskModel

    backbone, _ = load_backbone("tiny-bert")
    model = MultiTaskModel(backbone, [HeadSpec("t", "classification", 2, ["a", "b"])])
    with pytest.raises(BitblendError, match=r"precision.keep_fp32\[1\] 'nope\*': matches no"):
        prec.convert_module(model)


# -- step health ----------------------------------------------------------------------------
def test_nonfinite_gradient_is_attributed_to_the_first_module_in_backward_order() -> None:
    prec = build_precision(PrecisionConfig(recipe="32-true"), CPU)
    model = prec.convert_module(_mlp())
    opt = build_optimizer(prec.optimizer_parameters(model), OptimizerConfig())
    # Poison the gradient flowing out of layer 2 into layer 0: layer 0 is the first (in
    # backward order) whose weight gradient is non-finite; layer 2's own grads stay finite.
    model[1].register_full_backward_hook(lambda m, gi, go: (gi[0] * math.inf,))
    x, y = _data(32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.functional.cross_entropy(model(x), y).backward()
    result = prec.optimizer_step(opt, 1.0)
    assert not result.stepped
    assert result.nonfinite_module == "0"


def test_stuck_loss_scale_stops_the_run_with_a_bf16_hint() -> None:
    health = StepHealth(min_loss_scale=1.0, stuck_steps=3)
    health.check_scale(0.5)
    health.check_scale(0.25)
    health.check_scale(2.0)  # recovered: the count restarts
    health.check_scale(0.5)
    health.check_scale(0.5)
    with pytest.raises(LossScaleStuck, match="bf16-mixed"):
        health.check_scale(0.25)
    assert health.state_dict() == {"low_steps": 3}


def test_fp8_emulation_matches_torchaos_real_fp8_linear_tensorwise() -> None:
    """torchao's Float8Linear (real e4m3/e5m2 casts and torch._scaled_mm, which also runs on
    CPU, slowly) against our emulation: same tensorwise recipe, so outputs and gradients
    agree to >= 30 dB SQNR (differences: bf16 rounding of the GEMM output)."""
    from bitblend.precision.fp8 import convert_torchao

    torch.manual_seed(0)
    real = nn.Sequential()
    real.add_module("backbone", nn.Sequential(nn.Linear(256, 128)))
    emu = nn.Linear(256, 128)
    emu.load_state_dict(real.backbone[0].state_dict())
    emu.__class__ = Fp8EmulatedLinear
    emu.fp8_scaling = "tensorwise"
    assert convert_torchao(real, "tensorwise", lambda name: False) == ["backbone.0"]
    assert type(real.backbone[0]).__name__ == "Float8Linear"
    x = torch.randn(64, 256) * torch.logspace(-2, 1, 256)
    xr, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(64, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yr, ye = real(xr), emu(xe)
    yr.backward(g)
    ye.backward(g)
    assert _sqnr_db(yr, ye) >= 30
    assert _sqnr_db(xr.grad, xe.grad) >= 30
    assert _sqnr_db(real.backbone[0].weight.grad, emu.weight.grad) >= 30
