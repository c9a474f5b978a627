"""Audio in training: a text + image + audio + tabular mixed batch under every CPU precision,
bit-for-bit resume with an audio task (SpecAugment on) in the mixture, predict on audio
paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from bitblend.config.load import read_yaml, recipe_from_dict
from bitblend.train.trainer import Trainer

pytestmark = pytest.mark.slow  # trains through the Trainer

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A text CSV and an audio CSV whose `clip` column names WAV files (low or high tones)."""
    d = tmp_path_factory.mktemp("audio_data")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=6)) for _ in range(64)]
    labels = ["yes" if "alpha" in t.split() else "no" for t in texts]
    pd.DataFrame({"text": texts, "label": labels}).to_csv(d / "text.csv", index=False)
    (d / "clips").mkdir()
    rows = []
    for i in range(48):
        high = i % 2 == 1
        secs = 0.2 + 0.05 * (i % 4)  # ragged lengths: padding is masked
        t = np.arange(int(secs * 8000)) / 8000
        wave = 0.4 * np.sin(2 * np.pi * (1500.0 if high else 300.0) * t) + rng.normal(
            0, 0.02, t.size
        )
        sf.write(d / "clips" / f"{i}.wav", wave.astype(np.float32), 8000)
        rows.append({"clip": f"clips/{i}.wav", "label": "high" if high else "low"})
    pd.DataFrame(rows).to_csv(d / "audio.csv", index=False)
    return {"text": d / "text.csv", "audio": d / "audio.csv"}


def _recipe(data: dict[str, Path], precision: str, **train: object) -> dict:
    audio = {"name": "tones", "data": str(data["audio"]), "modality": "audio",
             "audio_column": "clip", "clip_seconds": 0.4, "n_mels": 16, "patch_frames": 8,
             "patch_mels": 8, "spec_augment": True}  # fmt: skip
    return {
        "name": "four",
        "model": {"backbone": "tiny-bert", "max_length": 16, "dropout": 0.0},
        "tasks": [
            {"name": "words", "data": str(data["text"]), "modality": "text"},
            {"name": "digits", "data": "digits", "modality": "image", "max_examples": 32},
            audio,
            {"name": "cancer", "data": "breast_cancer", "head": "binary", "max_examples": 32},
        ],
        "mixing": {"strategy": "uniform", "batches": "mixed"},
        "precision": {"recipe": precision},
        "optimizer": {"lr": 3e-3},
        "schedule": {"name": "constant"},
        "train": {"steps": 3, "batch_size": 16, "eval_max_examples": 8, "threads": 2, **train},
    }


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _check_steps(run: Path, steps: int) -> None:
    """Every step mixed all four tasks, was finite, and logged the audio front end's time."""
    train = [r for r in _rows(run) if r["split"] == "train"]
    assert len(train) == steps
    for r in train:
        assert set(r["task"].split("+")) == {"words", "digits", "tones", "cancer"}
        assert all(np.isfinite(v) for v in r["task_loss"].values()) and not r["skipped"]
        assert 0 < r["audio_feature_s"] < r["step_time_s"]
        assert r["audio_feature_frac"] == pytest.approx(r["audio_feature_s"] / r["step_time_s"])
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["tasks"]) == {"words", "digits", "tones", "cancer"}


@pytest.fixture(scope="module")
def straight(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step 32-true run of the four tasks, checkpointed at steps 2 and 4."""
    run = tmp_path_factory.mktemp("four") / "straight"
    recipe = _recipe(data, "32-true", steps=4, checkpoint_every=2, keep_checkpoints=0,
                     eval_every=2)  # fmt: skip
    Trainer(recipe_from_dict(recipe), run, show_progress=False).fit()
    return run


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_four_modality_batch_trains(
    data: dict[str, Path], straight: Path, tmp_path: Path, precision: str
) -> None:
    """One micro-batch holds all four tasks under each CPU precision recipe."""
    if precision == "32-true":
        _check_steps(straight, 4)
        return
    run = tmp_path / precision
    Trainer(recipe_from_dict(_recipe(data, precision, steps=2)), run, show_progress=False).fit()
    _check_steps(run, 2)


def test_resume_with_audio_task_is_bitwise(straight: Path, tmp_path: Path) -> None:
    """Stop after step 2, resume: the same losses and weights as the straight run, with
    SpecAugment drawing masks from the checkpointed RNG."""
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    for name in ("model", "checkpoints/step-4"):
        shutil.rmtree(cut / name)
    for name in ("eval.json", "summary.json"):
        (cut / name).unlink()
    Trainer(recipe_from_dict(read_yaml(cut / "recipe.yaml")), cut, resume=True,
            show_progress=False).fit()  # fmt: skip
    loss = lambda run: {r["step"]: r["loss"] for r in _rows(run) if r["split"] == "train"}  # noqa: E731
    a, b = loss(straight), loss(cut)
    assert [a[s] for s in (3, 4)] == [b[s] for s in (3, 4)]
    wa = load_file(str(straight / "checkpoints/step-4/model.safetensors"))
    wb = load_file(str(cut / "checkpoints/step-4/model.safetensors"))
    assert any("audio" in k for k in wa)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_predict_reads_audio_paths(data: dict[str, Path], straight: Path) -> None:
    """`predict` on a file of audio paths (relative to the file) gives one label per row,
    the same as the model's outputs on the decoded clips."""
    from bitblend.runs.evaluate import predict_file
    from bitblend.runs.load import load_run

    inp = data["audio"].parent / "input.jsonl"
    inp.write_text("".join(json.dumps({"clip": f"clips/{i}.wav"}) + "\n" for i in range(6)))
    preds = predict_file(load_run(straight), inp, "tones")
    assert len(preds) == 6 and all(p["label"] in ("low", "high") for p in preds), preds


def test_serve_request_with_base64_audio_equals_predict(
    data: dict[str, Path], straight: Path
) -> None:
    """A `POST /v1/predict` body carrying WAV data URIs parses into the table `predict` reads
    from paths, batched requests concatenate their clips, and the outputs are the same."""
    import base64

    from bitblend.runs.load import load_run
    from bitblend.serve.batcher import concat_tables
    from bitblend.serve.requests import parse_request

    run = load_run(straight)
    clips = [data["audio"].parent / "clips" / f"{i}.wav" for i in range(3)]
    uris = ["data:audio/wav;base64," + base64.b64encode(p.read_bytes()).decode() for p in clips]
    body = json.dumps([{"task": "tones", "clip": u} for u in uris]).encode()
    parsed = parse_request(body, run)
    (group,) = parsed.groups
    assert group.task == "tones" and group.table.audio is not None and len(group.table) == 3
    joined = concat_tables([parse_request(json.dumps({"task": "tones", "clip": u}).encode(),
                                          run).groups[0].table for u in uris])  # fmt: skip
    assert joined.audio is not None and len(joined.audio) == 3
    inp = data["audio"].parent / "three.jsonl"
    inp.write_text("".join(json.dumps({"clip": f"clips/{i}.wav"}) + "\n" for i in range(3)))
    from bitblend.data.sources import read_inputs

    want = run.outputs("tones", read_inputs(inp, run.task("tones")[1]))
    np.testing.assert_array_equal(run.outputs("tones", group.table), want)
    np.testing.assert_array_equal(run.outputs("tones", joined), want)


def test_onnx_export_of_an_audio_run_is_a_one_line_error(
    straight: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not supported yet: one line, exit 2, nothing written (not a traceback from the tracer)."""
    from bitblend.cli import main

    out = straight.parent / "onnx-out"
    assert main(["export", str(straight), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task tones has audio input" in err[0] and not out.exists()
