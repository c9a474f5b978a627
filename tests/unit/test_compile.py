"""model.compile (train/compile.py): when auto compiles, and that compiled blocks train the
same model as eager ones."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from bitblend.config.load import recipe_from_dict
from bitblend.train.compile import MIN_AUTO_WIDTH, compile_decision, cxx_compiler
from bitblend.train.trainer import Trainer


def _recipe(**model: object) -> object:
    return recipe_from_dict({
        "name": "compile-test",
        "model": {"backbone": "llama-tiny", "max_length": 32, "vocab_size": 300, **model},
        "tasks": [{"name": "lm", "data": "election_tweets", "head": "causal_lm", "packing": True,
                   "max_examples": 200}],
        "precision": {"recipe": "32-true"},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "train": {"steps": 3, "batch_size": 4, "seed": 0, "eval_every": 0},
    })  # fmt: skip


class _Cfg:
    def __init__(self, kind: str, width: int) -> None:
        self.model_type, self.hidden_size = kind, width


class _Backbone(torch.nn.Module):
    def __init__(self, kind: str, width: int) -> None:
        super().__init__()
        self.config = _Cfg(kind, width)


def test_auto_compiles_wide_llama_blocks_on_cpu_alone() -> None:
    r = _recipe()
    wide = _Backbone("llama", MIN_AUTO_WIDTH)
    on, why = compile_decision(r, wide, "cpu", 1, "bf16-mixed")  # type: ignore[arg-type]
    assert on == (cxx_compiler() is not None), why
    for args, reason in [
        ((_Backbone("llama", MIN_AUTO_WIDTH - 1), "cpu", 1, "bf16-mixed"), "width"),
        ((_Backbone("bert", 384), "cpu", 1, "bf16-mixed"), "bert"),
        ((wide, "cuda", 1, "bf16-mixed"), "cuda"),
        ((wide, "cpu", 2, "bf16-mixed"), "several processes"),
        ((wide, "cpu", 1, "fp8-emulated"), "fp8-emulated"),
    ]:
        on, why = compile_decision(r, *args)  # type: ignore[arg-type]
        assert not on and reason in why
    off = dataclasses.replace(r, model=dataclasses.replace(r.model, compile="eager"))  # type: ignore[attr-defined]
    assert compile_decision(off, wide, "cpu", 1, "bf16-mixed")[0] is False  # type: ignore[arg-type]


@pytest.mark.slow  # inductor compiles the block's forward and backward (~25-60 s)
@pytest.mark.skipif(cxx_compiler() is None, reason="inductor's CPU backend needs a C++ compiler")
def test_compiled_blocks_train_like_eager(tmp_path: Path) -> None:
    """Three steps with every block compiled give eager's losses and weights (fp32, to
    rounding of the fused loops), and the summary says what ran."""
    runs = {}
    for mode in ("eager", "blocks"):
        tr = Trainer(_recipe(compile=mode), tmp_path / mode, show_progress=False)  # type: ignore[arg-type]
        assert tr.compiled == (mode == "blocks")
        blocks = tr.model.backbone.layers
        assert all((b._compiled_call_impl is not None) == (mode == "blocks") for b in blocks)
        losses = [float(tr.train_step()["loss"]) for _ in range(3)]
        runs[mode] = (losses, {k: v.detach().clone() for k, v in tr.model.state_dict().items()})
    assert runs["blocks"][0] == pytest.approx(runs["eager"][0], rel=1e-4)
    for k, v in runs["eager"][1].items():
        torch.testing.assert_close(runs["blocks"][1][k], v, rtol=1e-4, atol=1e-5)
