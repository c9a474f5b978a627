"""Low-precision variants through the real Trainer and CLI: resume, bytes, health, errors."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitblend.config.load import read_yaml, recipe_from_dict
from bitblend.train.trainer import Trainer
from tests.conftest import make_recipe
from tests.integration.test_trainer import _losses, _train, _weights
from tests.unit.test_cli_errors import assert_one_line_error, run_cli

PURE = ["precision.recipe=bf16-true", "precision.master_weights=false"]
VARIANTS = {
    "bf16-true-sr": [*PURE, "precision.rounding=stochastic"],
    "bf16-true-kahan": [*PURE, "precision.rounding=kahan"],
    "bf16-true-sr-8bit": [*PURE, "precision.rounding=stochastic", "precision.state_bits=8"],
    "bf16-mixed-16bit": ["precision.recipe=bf16-mixed", "precision.state_bits=16"],
    "fp8-emulated": ["precision.recipe=fp8-emulated", "precision.fp8_scaling=rowwise"],
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_equals_straight_run_bitwise(tmp_path: Path, variant: str) -> None:
    """Each low-precision variant checkpoints everything it keeps (SR generator, Kahan
    buffers, 8-bit/bf16 states): a resumed run reproduces the straight one bit for bit."""
    recipe = make_recipe(
        *VARIANTS[variant], "train.steps=6", "train.checkpoint_every=3", "train.keep_checkpoints=0"
    )
    straight = tmp_path / "straight"
    _train(recipe, straight)
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    for name in ("model", "checkpoints/step-6"):
        shutil.rmtree(cut / name)
    Trainer(recipe_from_dict(read_yaml(cut / "recipe.yaml")), cut, resume=True,
            show_progress=False).fit()  # fmt: skip
    a, b = _losses(straight), _losses(cut)
    assert [a[s] for s in range(4, 7)] == [b[s] for s in range(4, 7)]
    wa, wb = _weights(straight, 6), _weights(cut, 6)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    sa = load_file(str(straight / "checkpoints/step-6/state.safetensors"))
    sb = load_file(str(cut / "checkpoints/step-6/state.safetensors"))
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    # ...and steps 4-6 really trained (a run whose weights never move resumes trivially);
    # single-step losses of 6 tiny-bert steps are too noisy to show learning.
    w3 = _weights(straight, 3)
    moved = [n for n in wa if wa[n].is_floating_point() and not torch.equal(w3[n], wa[n])]
    assert len(moved) > 0.9 * len(wa), (len(moved), len(wa))


@pytest.mark.slow
def test_model_state_bytes_per_param_by_variant(tmp_path: Path) -> None:
    """summary.json measures weights + grads + masters + states: fp32 AdamW ~16 B/param,
    pure bf16 + SR + 8-bit states ~6 (tiny-bert's many small tensors keep 32-bit states)."""
    per_param = {}
    for name, sets in {"fp32": ["precision.recipe=32-true"], **VARIANTS}.items():
        if name == "fp8-emulated":
            continue
        trainer = _train(make_recipe(*sets, "train.steps=2"), tmp_path / name)
        summary = json.loads((trainer.run_dir / "summary.json").read_text())
        per_param[name] = summary["model_state_bytes_per_param"]
    assert per_param["fp32"] == pytest.approx(16.0, abs=0.01)
    assert per_param["bf16-true-sr"] == pytest.approx(2 + 2 + 8, abs=0.05)  # w, g, fp32 moments
    assert per_param["bf16-true-kahan"] == pytest.approx(2 + 2 + 2 + 8, abs=0.05)
    assert per_param["bf16-mixed-16bit"] == pytest.approx(4 + 4 + 4, abs=0.05)
    assert per_param["bf16-true-sr-8bit"] < 6.5, per_param


@pytest.mark.slow
def test_skipped_step_names_the_module_where_the_inf_appeared(tmp_path: Path) -> None:
    recipe = make_recipe("precision.recipe=bf16-mixed", "train.steps=3")
    trainer = Trainer(recipe, tmp_path / "run", show_progress=False)
    layer = trainer.model.backbone.encoder.layer[1].intermediate.dense
    layer.weight.register_hook(lambda g: g * math.inf if trainer.step == 1 else g)
    summary = trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    bad = [r for r in rows if r.get("skipped")]
    assert len(bad) == 1 and summary["skipped_steps"] == 1
    assert bad[0]["nonfinite_module"] == "backbone.encoder.layer.1.intermediate.dense"
    assert all({"loss_scale", "grad_norm", "skipped"} <= r.keys() for r in rows
               if r["split"] == "train")  # fmt: skip


@pytest.mark.slow
def test_stuck_loss_scale_stops_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """16-mixed with a gradient that always overflows ends in one line suggesting bf16."""
    recipe = make_recipe(
        "precision.recipe=16-mixed", "precision.init_scale=4", "precision.stuck_steps=3",
        "train.steps=30",
    )  # fmt: skip
    with pytest.warns(UserWarning, match="16-mixed on a CPU"):
        trainer = Trainer(recipe, tmp_path / "run", show_progress=False)
    trainer.model.heads["bbc"][1].weight.register_hook(lambda g: g * math.inf)
    from bitblend.precision.health import LossScaleStuck

    with pytest.raises(LossScaleStuck, match=r"Use precision\.recipe bf16-mixed"):
        trainer.fit()
    assert trainer.step < 30


@pytest.mark.parametrize(
    ("sets", "needles"),
    [
        (["precision.recipe=fp8"], ["precision.recipe fp8", "fp8-emulated"]),
        (["precision.state_bits=4", "optimizer.name=rmsprop"], ["precision.state_bits", "adamw"]),
        (["precision.keep_fp32=[nothing.here]"], ["precision.keep_fp32[0]", "matches no module"]),
        (["precision.rounding=kahan"], ["precision.rounding kahan", "bf16-true"]),
        (["precision.state_bits=12"], ["precision.state_bits"]),
    ],
)
def test_unsupported_combinations_are_one_line_errors(
    sets: list[str], needles: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "tiny", "--out", str(tmp_path / "run"), "--quiet"]
    for s in sets:
        argv += ["--set", s]
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "bad",
    [
        "backbone.encoder.layer.1.intermediate.dense",
        # fused q/k/v (model.kernels=auto) are Linear subclasses: still fp8 candidates
        "backbone.encoder.layer.1.attention.self.query",
        "backbone.encoder.layer.1.attention.self.value",
    ],
)
def test_doctor_flags_an_injected_huge_activation(bad: str) -> None:
    from bitblend.train.probe import diagnose

    def inject(model: torch.nn.Module) -> None:
        model.get_submodule(bad).register_forward_hook(lambda m, i, out: out * 1e6)

    # judged for a GPU without bf16 (fast fp16): 16-mixed unless a layer overflows fp16
    gpu = {"bf16_native": False, "fp16_fast": True}
    clean = diagnose(make_recipe(), batches=1, **gpu)
    assert clean.keep_fp32 == [] and clean.recommended_recipe == "16-mixed"
    report = diagnose(make_recipe(), batches=1, model_hook=inject, **gpu)
    assert bad in report.keep_fp32
    assert report.recommended_recipe == "32-true"  # fp16 would overflow, bf16 not native
    assert any("exceed fp16's 65504" in f and bad in f for f in report.findings)
    row = next(s for s in report.to_json()["layers"] if s["name"] == bad)
    assert row["activation"]["amax"] > 65504 and row["activation"]["e4m3_saturated"] > 0.5


def test_doctor_never_recommends_fp16_on_a_cpu() -> None:
    """A CPU has no fast fp16 matmuls (build_precision warns ~400x slower than fp32): one
    without native bf16 is recommended 32-true, what `auto` picks, even where fp16's range
    holds every value."""
    from bitblend.precision.recipes import resolve_auto
    from bitblend.train.probe import diagnose

    report = diagnose(make_recipe(), batches=1, bf16_native=False, fp16_fast=False)
    assert report.recommended_recipe == "32-true" == resolve_auto("cpu", False, False)
    assert not any("exceed fp16's 65504" in f for f in report.findings)  # fp16 would fit
    assert any("neither native bf16" in f for f in report.findings)
    native = diagnose(make_recipe(), batches=1, bf16_native=True, fp16_fast=False)
    assert native.recommended_recipe == "bf16-mixed" == resolve_auto("cpu", True, False)


def test_doctor_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["doctor", "tiny", "--batches", "1", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    # on this CPU: what `auto` resolves to (fp16 is never the fast recipe on a CPU)
    from bitblend.precision.recipes import cpu_bf16_native, resolve_auto

    if not torch.cuda.is_available():
        assert data["recommended_recipe"] == resolve_auto("cpu", cpu_bf16_native(), False)
    names = {row["name"] for row in data["layers"]}
    assert "backbone.encoder.layer.0.attention.self.query" in names
    assert all(0 <= row["gradient"]["fp16_underflow"] <= 1 for row in data["layers"])


@pytest.mark.slow
def test_predict_and_bench_infer_per_serving_precision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An fp8-emulated run serves in run (bf16-mixed), fp32, bf16 and int8; bench-infer
    reports latency percentiles, throughput and accuracy for each at batch 1 and 4."""
    run = tmp_path / "run"
    _train(make_recipe("precision.recipe=fp8-emulated", "train.steps=3"), run)
    texts = tmp_path / "in.jsonl"
    texts.write_text('{"text": "shares fell as the bank cut rates"}\n{"text": "the match"}\n')
    probs = {}
    names = json.loads((run / "labels.json").read_text())["bbc"]
    for prec in ("run", "fp32", "bf16", "int8"):
        code, out, err = run_cli(["predict", str(run), "--input", str(texts), "--precision", prec],
                                 capsys)  # fmt: skip
        assert code == 0, err
        rows = [json.loads(x) for x in out.splitlines()]
        assert len(rows) == 2 and all(abs(sum(r["probs"].values()) - 1) < 1e-4 for r in rows)
        assert all(r["label"] in names and list(r["probs"]) == names for r in rows)
        probs[prec] = [[r["probs"][n] for n in names] for r in rows]
    # Every serving precision computes the fp32 model's probabilities up to its rounding.
    for prec in ("run", "bf16", "int8"):
        diff = max(abs(a - b) for ra, rb in zip(probs[prec], probs["fp32"], strict=True)
                   for a, b in zip(ra, rb, strict=True))  # fmt: skip
        assert diff < 0.05, (prec, diff)
    code, out, err = run_cli(
        ["bench-infer", str(run), "--precision", "fp32,bf16,int8", "--batch-sizes", "1,4",
         "--iters", "3", "--json"], capsys,
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["precision"], r["batch_size"]) for r in rows] == [
        ("fp32", 1), ("fp32", 4), ("bf16", 1), ("bf16", 4), ("int8", 1), ("int8", 4)
    ]  # fmt: skip
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["examples_per_s"] > 0
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["agreement"] <= 1
    by = {r["precision"]: r for r in rows}
    assert by["fp32"]["agreement"] == 1.0
    assert by["bf16"]["weight_bytes"] < 0.6 * by["fp32"]["weight_bytes"]
    code, _, err = run_cli(["bench-infer", str(run), "--precision", "fp4"], capsys)
    assert_one_line_error(code, err, "--precision fp4", "int8")


# -- weight decay ---------------------------------------------------------------------------
DECAY_SETTINGS = {
    "32-true": ["precision.recipe=32-true"],
    "bf16-mixed": ["precision.recipe=bf16-mixed"],
    "16-mixed": ["precision.recipe=16-mixed"],
    "fp8-emulated": ["precision.recipe=fp8-emulated"],
    "bf16-true-master": ["precision.recipe=bf16-true", "precision.master_weights=true"],
    "bf16-true-nearest": PURE,
    "bf16-true-sr": VARIANTS["bf16-true-sr"],
    "bf16-true-kahan": VARIANTS["bf16-true-kahan"],
}


def _decayed(setting: list[str]) -> tuple[set[str], list[tuple[float, float, int]]]:
    """Names of the model parameters that weight decay moves in one Trainer step with zero
    gradients (nothing else can move them), and the optimizer's (decay, lr, size) groups."""
    recipe = make_recipe(*setting, "optimizer.lr=1.0", "optimizer.weight_decay=0.5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16-mixed on CPU warns that it is slow
        trainer = Trainer(recipe, Path("unused"), show_progress=False)
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    # A zero loss that touches every weight: zero gradients, through the loss scale (16-mixed).
    trainer.precision.backward(sum((p.float() * 0).sum() for p in params.values()))
    assert trainer.precision.optimizer_step(trainer.optimizer, None).stepped
    moved = {n for n, p in params.items() if not torch.equal(before[n], p.detach())}
    groups = [
        (g["weight_decay"], g["lr"], len(g["params"])) for g in trainer.optimizer.param_groups
    ]
    return moved, groups


@pytest.mark.slow  # nine tiny-bert Trainers (~12 s)
def test_weight_decay_hits_the_same_weights_under_every_precision() -> None:
    """Decay groups are decided from the model's own parameters (name and shape): the fp32
    stand-ins of bf16-true (empty between steps without master weights) get the same
    groups as fp32 weights. Matrices decay; biases and norm gains never do."""
    recipe = make_recipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = Trainer(recipe, Path("unused"), show_progress=False).model
    matrices = {n for n, p in ref.named_parameters() if p.requires_grad and p.ndim >= 2}
    assert matrices and len(matrices) < sum(1 for _ in ref.parameters())
    first_groups = None
    for name, setting in DECAY_SETTINGS.items():
        moved, groups = _decayed(setting)
        assert moved == matrices, (name, sorted(moved ^ matrices)[:5])
        first_groups = first_groups or groups
        assert groups == first_groups, name
