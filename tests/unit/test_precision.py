"""Precision recipes: what runs in which dtype, auto's choice, scaler and master state."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from bitblend.config.schema import PrecisionConfig
from bitblend.models.backbones import load_backbone
from bitblend.models.trunk import HeadSpec, MultiTaskModel
from bitblend.precision.full import FullPrecision
from bitblend.precision.half import HalfPrecision
from bitblend.precision.mixed import MixedPrecision
from bitblend.precision.recipes import (
    build_precision,
    cpu_bf16_native,
    resolve_auto,
    slow_bf16_warning,
)
from tests.conftest import make_recipe

CPU = torch.device("cpu")


def _model() -> MultiTaskModel:
    torch.manual_seed(0)
    backbone, _ = load_backbone("tiny-bert")
    return MultiTaskModel(backbone, [HeadSpec("t", "classification", 3, ["a", "b", "c"])])


def _dtypes_seen(model: nn.Module, precision, kinds: tuple[type, ...]) -> dict[str, set]:
    """Output dtypes of every module of the given kinds during one forward pass."""
    seen: dict[str, set] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, kinds):

            def hook(_m, _i, out, name=name):
                seen.setdefault(name, set()).add(out.dtype)

            hooks.append(module.register_forward_hook(hook))
    ids = torch.randint(1000, 2000, (2, 16))
    with precision.forward_context():
        logits = model("t", ids, torch.ones_like(ids))
    for h in hooks:
        h.remove()
    seen["logits"] = {logits.dtype}
    return seen


@pytest.mark.parametrize(
    ("device", "cpu_bf16", "cuda_bf16", "want"),
    [
        ("cpu", True, False, "bf16-mixed"),
        ("cpu", False, False, "32-true"),
        ("cuda", False, True, "bf16-mixed"),
        ("cuda", False, False, "32-true"),
    ],
)
def test_auto_picks_native_bf16_else_fp32_never_fp16(device, cpu_bf16, cuda_bf16, want) -> None:
    assert resolve_auto(device, cpu_bf16, cuda_bf16) == want


def test_auto_on_this_machine_follows_its_cpu_flags() -> None:
    p = build_precision(PrecisionConfig(recipe="auto"), CPU)
    assert p.name == ("bf16-mixed" if cpu_bf16_native() else "32-true")
    assert p.describe()["requested"] == "auto"


@pytest.mark.parametrize("name", ["bf16-true", "bf16-mixed"])
def test_bf16_by_name_on_a_cpu_without_native_bf16_warns_that_it_is_slow(name: str) -> None:
    slow = slow_bf16_warning(name, CPU, cpu_bf16=False)
    assert slow.startswith(f"{name} on a CPU without native bf16") and "auto" in slow
    assert slow_bf16_warning(name, CPU, cpu_bf16=True) == ""
    assert slow_bf16_warning(name, torch.device("cuda"), cpu_bf16=False) == ""
    for fast in ("32-true", "fp8-emulated", "16-mixed"):  # 16-mixed has its own warning
        assert slow_bf16_warning(fast, CPU, cpu_bf16=False) == ""


def test_a_bf16_true_trainer_logs_the_slow_bf16_warning_where_this_cpu_lacks_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from bitblend.train.trainer import Trainer

    recipe = make_recipe("precision.recipe=bf16-true", "train.steps=1", "train.eval_max_examples=8")
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(recipe, tmp_path / "run", show_progress=False)
        assert "without native bf16" not in caplog.text  # setup: bad input prints errors alone
        trainer.fit()
    warned = "bf16-true on a CPU without native bf16" in caplog.text
    assert warned == (not cpu_bf16_native())


def test_bf16_mixed_runs_matmuls_in_bf16_and_norms_heads_in_fp32() -> None:
    model = _model()
    p = build_precision(PrecisionConfig(recipe="bf16-mixed"), CPU)
    p.convert_module(model)
    seen = _dtypes_seen(model, p, (nn.Linear, nn.LayerNorm))
    trunk_linears = [k for k in seen if k.startswith("backbone") and "LayerNorm" not in k]
    norms = [k for k in seen if "LayerNorm" in k]
    assert trunk_linears and norms
    assert all(seen[k] == {torch.bfloat16} for k in trunk_linears)
    assert all(seen[k] == {torch.float32} for k in norms)
    assert seen["heads.t.1"] == {torch.float32} and seen["logits"] == {torch.float32}
    # Weights stay fp32 (autocast casts on the fly); the optimizer owns them directly.
    assert all(q.dtype == torch.float32 for q in model.parameters())


def test_32_true_changes_nothing() -> None:
    model = _model()
    p = build_precision(PrecisionConfig(recipe="32-true"), CPU)
    p.convert_module(model)
    seen = _dtypes_seen(model, p, (nn.Linear, nn.LayerNorm))
    assert all(v == {torch.float32} for v in seen.values())


def test_bf16_true_casts_weights_and_keeps_masters_in_state() -> None:
    model = _model()
    p = build_precision(PrecisionConfig(recipe="bf16-true"), CPU)
    p.convert_module(model)
    owned = p.optimizer_parameters(model)
    seen = _dtypes_seen(model, p, (nn.Linear, nn.LayerNorm))
    assert seen["backbone.encoder.layer.0.intermediate.dense"] == {torch.bfloat16}
    # The norm computes in fp32 but hands the bf16 trunk a bf16 tensor.
    assert seen["backbone.embeddings.LayerNorm"] == {torch.bfloat16}
    assert model.backbone.embeddings.LayerNorm.weight.dtype == torch.float32
    assert all(q.dtype == torch.float32 for q in owned)
    state = p.state_dict()
    assert len(state["masters"]) == sum(q.dtype == torch.bfloat16 for q in model.parameters())

    # A fresh recipe restores masters and the model's bf16 copies from that state.
    model2 = _model()
    p2 = build_precision(PrecisionConfig(recipe="bf16-true"), CPU)
    p2.convert_module(model2)
    p2.optimizer_parameters(model2)
    with torch.no_grad():
        for m in p.state_dict()["masters"]:
            m.add_(1.0)
    p2.load_state_dict(p.state_dict())
    for (_, a), (_, b) in zip(p._pairs, p2._pairs, strict=True):
        assert torch.equal(a, b)


def test_16_mixed_warns_on_cpu_and_round_trips_scaler_state() -> None:
    with pytest.warns(UserWarning, match="400x slower"):
        p = build_precision(PrecisionConfig(recipe="16-mixed", init_scale=256.0), CPU)
    assert p.describe()["loss_scaler"] is True
    model = _model()
    p.convert_module(model)
    opt = torch.optim.SGD(p.optimizer_parameters(model), lr=0.1)
    ids = torch.randint(1000, 2000, (2, 8))
    with p.forward_context():
        loss = model("t", ids, torch.ones_like(ids)).float().sum()
    p.backward(loss)
    result = p.optimizer_step(opt, max_grad_norm=1.0)
    assert result.stepped and result.loss_scale == 256.0
    with pytest.warns(UserWarning):
        q = build_precision(PrecisionConfig(recipe="16-mixed"), CPU)
    q.load_state_dict(p.state_dict())
    assert q.scaler is not None and q.scaler.get_scale() == 256.0


def test_non_finite_gradient_skips_step_in_every_recipe() -> None:
    for name in ("32-true", "bf16-mixed", "bf16-true"):
        model = _model()
        p = build_precision(PrecisionConfig(recipe=name), CPU)
        p.convert_module(model)
        opt = torch.optim.SGD(p.optimizer_parameters(model), lr=0.1)
        before = [q.detach().clone() for q in model.parameters()]
        ids = torch.randint(1000, 2000, (2, 8))
        with p.forward_context():
            loss = model("t", ids, torch.ones_like(ids)).float().sum() * float("nan")
        p.backward(loss)
        result = p.optimizer_step(opt, max_grad_norm=None)
        assert not result.stepped, name
        for a, b in zip(before, model.parameters(), strict=True):
            assert torch.equal(a, b), name


def test_attention_dropout_overrides_only_the_attention_keys() -> None:
    """On the real MiniLM config: hidden dropout stays 0.1 unless `dropout` says otherwise."""
    cfg = load_backbone("minilm", None, 0.0)[0].config
    assert (cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob) == (0.1, 0.0)
    cfg = load_backbone("minilm", 0.2, 0.05)[0].config
    assert (cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob) == (0.2, 0.05)
    cfg = load_backbone("tiny-gpt", 0.0, 0.3)[0].config
    assert (cfg.resid_pdrop, cfg.embd_pdrop, cfg.attn_pdrop) == (0.0, 0.0, 0.3)


PURE = {"recipe": "bf16-true", "master_weights": False}


@pytest.mark.parametrize(
    ("settings", "family", "keys"),
    [
        ({"recipe": "32-true"}, FullPrecision, set()),
        ({"recipe": "bf16-mixed"}, MixedPrecision, set()),
        ({"recipe": "16-mixed"}, MixedPrecision, {"scaler"}),
        ({"recipe": "fp8-emulated"}, MixedPrecision, set()),
        ({"recipe": "bf16-true"}, HalfPrecision, {"masters"}),
        (PURE, HalfPrecision, set()),
        ({**PURE, "rounding": "stochastic"}, HalfPrecision, {"rounding_rng"}),
        ({**PURE, "rounding": "kahan"}, HalfPrecision, {"kahan"}),
    ],
)
def test_each_recipe_is_its_family_class_and_keeps_the_checkpoint_keys(
    settings: dict, family: type, keys: set[str]
) -> None:
    """build_precision picks one class per mode family; checkpoints keep the state keys that
    runs written before the split into classes hold, so those runs resume."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16-mixed on CPU
        p = build_precision(PrecisionConfig(**settings), CPU)
    assert type(p) is family
    model = _model()
    p.convert_module(model)
    p.optimizer_parameters(model)
    state = p.state_dict()
    assert set(state) == {"name", "health"} | keys
    assert state["name"] == settings["recipe"]
