"""runs/: serving precisions on runs trained in any precision, and bench-infer's timing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import make_recipe
from tests.integration.test_trainer import _train
from tests.unit.test_cli_errors import run_cli


@pytest.fixture(scope="module")
def bf16_true_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT trained a few steps in bf16-true with 8-bit optimizer states (what the
    demo-like run that exposed the dtype mismatch used); model/ holds bf16 weights."""
    run = tmp_path_factory.mktemp("bf16") / "run"
    recipe = make_recipe(
        "precision.recipe=bf16-true", "precision.state_bits=8", "train.steps=3",
        "train.eval_max_examples=16",
    )  # fmt: skip
    _train(recipe, run)
    return run


def test_bf16_true_run_saves_bf16_weights(bf16_true_run: Path) -> None:
    """The premise: the saved trunk is bf16, so serving in fp32 must cast it."""
    from safetensors import safe_open

    with safe_open(str(bf16_true_run / "model" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert "BF16" in dtypes


@pytest.mark.parametrize("serving", ["run", "fp32", "bf16", "int8"])
def test_every_serving_precision_predicts_on_a_bf16_true_run(
    bf16_true_run: Path, serving: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """predict --precision P works on a bf16-true run for every P (fp32 and int8 used to
    fail with a dtype-mismatch traceback in the first matmul)."""
    texts = tmp_path / "in.jsonl"
    texts.write_text('{"text": "shares fell as the bank cut rates"}\n{"text": "the match"}\n')
    argv = ["predict", str(bf16_true_run), "--input", str(texts), "--precision", serving]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in out.splitlines()]
    assert len(rows) == 2
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-4 for r in rows)


def test_fp32_serving_of_a_bf16_true_run_is_the_upcast_model(bf16_true_run: Path) -> None:
    """fp32 serving computes with the saved bf16 weights exactly upcast to fp32: outputs
    match a forward of the upcast model, and every trunk weight is fp32."""
    from bitblend.models.trunk import load_model
    from bitblend.runs.load import load_run
    from bitblend.runs.transformer import TransformerRun

    run = load_run(bf16_true_run, "fp32")
    assert isinstance(run, TransformerRun)
    assert {p.dtype for p in run.model.parameters()} == {torch.float32}
    table, _ = run.eval_split("bbc")
    out = run.outputs("bbc", table)
    ref_model, _, _ = load_model(bf16_true_run / "model")
    ref_model.float()
    run.model = ref_model
    assert torch.equal(torch.from_numpy(out), torch.from_numpy(run.outputs("bbc", table)))


def test_bench_infer_on_a_bf16_true_run(
    bf16_true_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench-infer runs fp32 and int8 on a bf16-true run (the same traceback before)."""
    argv = ["bench-infer", str(bf16_true_run), "--precision", "fp32,int8", "--batch-sizes", "2",
            "--iters", "2", "--json"]  # fmt: skip
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert [r["precision"] for r in json.loads(out)] == ["fp32", "int8"]


def test_bench_infer_synchronises_around_every_timed_forward(
    bf16_true_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each timed forward is bracketed by a device synchronise (a no-op on the CPU, the
    difference between timing launches and timing kernels on CUDA): two calls per forward,
    warm-ups included, on the run's device."""
    from bitblend.bench import infer

    seen: list[torch.device] = []
    monkeypatch.setattr(infer, "synchronize", seen.append)
    iters, sizes = 3, [1, 2]
    infer.bench_infer(bf16_true_run, ["fp32"], sizes, iters)
    assert len(seen) == 2 * (iters + 2) * len(sizes)
    assert {d.type for d in seen} == {"cpu"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_synchronize_waits_for_queued_cuda_work() -> None:
    """After `synchronize`, queued CUDA kernels have finished (an event recorded after them
    reports done)."""
    from bitblend.device import synchronize

    dev = torch.device("cuda")
    x = torch.randn(4096, 4096, device=dev)
    for _ in range(20):
        x = x @ x
        x = x / x.norm()
    done = torch.cuda.Event()
    done.record()
    synchronize(dev)
    assert done.query()
