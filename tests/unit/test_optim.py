"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import itertools
import math
import typing
from dataclasses import replace

import pytest
import torch
from torch import nn

from bitblend.config.schema import OptimizerConfig, OptimizerName, ScheduleConfig
from bitblend.errors import BitblendError
from bitblend.optim.build import build_optimizer, build_schedule, lr_factor, param_roles
from bitblend.optim.lowbit import export_state, import_state

OPTIMIZERS = list(typing.get_args(OptimizerName))
EXPECTED_CLASS = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def test_every_schema_optimizer_is_covered() -> None:
    assert set(OPTIMIZERS) == set(EXPECTED_CLASS)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_builds_and_steps(name: str) -> None:
    model = small_model()
    cfg = OptimizerConfig(name=name, lr=0.01, momentum=0.5 if name != "adam" else 0.0)
    opt = build_optimizer(list(model.parameters()), cfg)
    assert type(opt) is EXPECTED_CLASS[name]
    assert all(g["lr"] == 0.01 for g in opt.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(3, 4)).pow(2).sum().backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weight_decay_skips_1d_params(name: str) -> None:
    model = small_model()
    params = list(model.parameters())
    opt = build_optimizer(params, OptimizerConfig(name=name, lr=0.1, weight_decay=0.5))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.5 for p in g["params"]}
    plain = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed == {id(p) for p in params if p.ndim == 2}
    assert plain == {id(p) for p in params if p.ndim == 1}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)

    # With zero gradients only weight decay can move a parameter: matrices move, biases
    # and norm gains stay exactly where they were.
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for b, p in zip(before, params, strict=True):
        if p.ndim == 1:
            assert torch.equal(b, p)
        else:
            assert not torch.equal(b, p)


class _Trunked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, 2)


def test_roles_come_from_the_model_not_from_the_tensors_the_optimizer_holds() -> None:
    """Stand-ins that are empty between steps (bf16-true without master weights) are grouped
    as the model's weights they stand for: decay by the weight's shape, lr by its name."""
    model = _Trunked()
    roles = param_roles(model)
    assert [(r.name, r.decay, r.new) for r in roles] == [
        ("backbone.0.weight", True, False),
        ("backbone.0.bias", False, False),
        ("backbone.1.weight", False, False),
        ("backbone.1.bias", False, False),
        ("head.weight", True, True),
        ("head.bias", False, True),
    ]
    stand_ins = [nn.Parameter(torch.empty(0)) for _ in roles]
    cfg = OptimizerConfig(name="adamw", lr=0.1, weight_decay=0.5, new_lr_scale=10.0)
    opt = build_optimizer(stand_ins, cfg, roles)
    named = {id(q): r.name for q, r in zip(stand_ins, roles, strict=True)}
    groups = [
        (g["weight_decay"], g["lr"], [named[id(p)] for p in g["params"]]) for g in opt.param_groups
    ]
    assert groups == [
        (0.5, 0.1, ["backbone.0.weight"]),
        (0.0, 0.1, ["backbone.0.bias", "backbone.1.weight", "backbone.1.bias"]),
        (0.5, 1.0, ["head.weight"]),
        (0.0, 1.0, ["head.bias"]),
    ]
    # new_lr_scale 1: one lr, so only the decay split remains.
    opt = build_optimizer(stand_ins, replace(cfg, new_lr_scale=1.0), roles)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 4]
    with pytest.raises(ValueError, match="5 optimizer parameters but 6 roles"):
        build_optimizer(stand_ins[:5], cfg, roles)


@pytest.mark.parametrize("name", ["adamw", "sgd"])  # decoupled decay and L2 alike
def test_weight_decay_shrinks_a_zero_gradient_weight(name: str) -> None:
    p = nn.Parameter(torch.ones(2, 2))
    opt = build_optimizer([p], OptimizerConfig(name=name, lr=0.1, weight_decay=0.5))
    p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((2, 2), 1 - 0.1 * 0.5))


def test_sgd_settings_are_passed() -> None:
    p = nn.Parameter(torch.ones(2, 2))
    cfg = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0)
    opt = build_optimizer([p], cfg)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["nesterov"] is True


def test_adam_betas_and_eps_are_passed() -> None:
    p = nn.Parameter(torch.ones(2, 2))
    cfg = OptimizerConfig(name="adam", betas=[0.8, 0.95], eps=1e-6)
    group = build_optimizer([p], cfg).param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6


# -- schedules -----------------------------------------------------------------------------


def f(step: int, total: int, **kw: object) -> float:
    return lr_factor(step, total, ScheduleConfig(**kw))  # type: ignore[arg-type]


def test_constant_with_warmup() -> None:
    got = [f(s, 10, name="constant", warmup_steps=4) for s in range(10)]
    assert got == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert f(0, 10, name="constant") == 1.0


def test_linear_decay() -> None:
    assert [f(s, 10, name="linear") for s in (0, 1, 5, 9, 10)] == pytest.approx(
        [1.0, 0.9, 0.5, 0.1, 0.0]
    )
    # After warmup the decay spans the remaining total - warmup steps.
    got = [f(s, 12, name="linear", warmup_steps=2) for s in (0, 1, 2, 7, 12)]
    assert got == pytest.approx([1 / 3, 2 / 3, 1.0, 0.5, 0.0])


def test_cosine_decay() -> None:
    got = [f(s, 12, name="cosine", warmup_steps=2) for s in (0, 1, 2, 7, 12)]
    assert got == pytest.approx([1 / 3, 2 / 3, 1.0, 0.5, 0.0])
    assert f(2 + 10 / 4, 12, name="cosine", warmup_steps=2) == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 4))
    )


def test_warmup_ratio_and_precedence() -> None:
    # warmup_ratio 0.25 of 8 steps = 2 warmup steps.
    got = [f(s, 8, name="constant", warmup_ratio=0.25) for s in (0, 1, 2)]
    assert got == pytest.approx([1 / 3, 2 / 3, 1.0])
    # warmup_steps takes precedence over warmup_ratio.
    got = [f(s, 8, name="constant", warmup_steps=1, warmup_ratio=0.5) for s in (0, 1)]
    assert got == pytest.approx([0.5, 1.0])


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_min_lr_ratio_is_the_floor(name: str) -> None:
    total = 20
    got = [f(s, total, name=name, warmup_steps=3, min_lr_ratio=0.1) for s in range(3, 40)]
    assert min(got) == pytest.approx(0.1)
    assert all(v >= 0.1 - 1e-12 for v in got)
    assert f(total, total, name=name, warmup_steps=3, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert f(100, total, name=name, min_lr_ratio=0.1) == pytest.approx(0.1)  # past the end
    midpoint = f(3 + 17 / 2, total, name=name, warmup_steps=3, min_lr_ratio=0.1)
    assert midpoint == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(a >= b for a, b in itertools.pairwise(got))  # never rises


def test_build_schedule_drives_the_optimizer_lr() -> None:
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = build_schedule(opt, 10, ScheduleConfig(name="linear", warmup_steps=1))
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5 * 0.5, 0.5, 0.5 * 8 / 9, 0.5 * 7 / 9])


def test_resume_with_other_parameter_groups_is_a_one_line_error() -> None:
    """A checkpoint from before the decay fix (every stand-in in the no-decay group) does
    not load into today's groups: one line saying why, not torch's ValueError."""
    model = _Trunked()
    roles = param_roles(model)
    stand_ins = [nn.Parameter(torch.empty(0)) for _ in roles]
    cfg = OptimizerConfig(name="adamw", weight_decay=0.01)
    with pytest.raises(ValueError, match="pass param_roles"):
        build_optimizer(stand_ins, cfg)  # empty stand-ins have no shape to group by
    # What the stand-ins' own (1-d, empty) shape used to give: everything without decay.
    old = build_optimizer(stand_ins, cfg, [replace(r, decay=False) for r in roles])
    assert [len(g["params"]) for g in old.param_groups] == [6]
    new = build_optimizer(stand_ins, cfg, roles)
    with pytest.raises(BitblendError, match=r"parameter groups of sizes \[6\], this run builds"):
        import_state(new, export_state(old))
    import_state(new, export_state(build_optimizer(stand_ins, cfg, roles)))  # same groups load
