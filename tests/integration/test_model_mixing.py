"""Model-level mixing end to end through the CLI, with tiny models trained in seconds:
tfidf-logreg runs, ensembles (saved specs used by eval/predict/distill), merges, distillation,
and the one-line errors of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import bitblend.precision.recipes  # noqa: F401  (library import-time logs before any capture)
from bitblend.cli import main
from bitblend.data.builtin import load_builtin
from bitblend.runs.load import load_run
from bitblend.runs.spec import split_indices

# The runs these tests combine are trained by `bitblend train` (module fixtures).
pytestmark = pytest.mark.slow

TINY = ["--quiet", "--set", "model.max_length=32", "--set", "train.eval_max_examples=32",
        "--set", "tasks.0.max_examples=null"]  # fmt: skip


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `bitblend ARGV` in this process."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit 2 and exactly one `bitblend: error:` line naming every needle."""
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bitblend: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.csv (400 BBC articles), heldout.csv (240, for ensembles and soups), and
    other.csv (the same texts with 3 coarser labels: another label space)."""
    root = tmp_path_factory.mktemp("mixing")
    bbc = load_builtin("bbc_news").train
    assert bbc.text is not None
    order = np.random.default_rng(11).permutation(len(bbc))
    frame = pd.DataFrame({"text": [bbc.text[i][:600] for i in order[:640]],
                          "label": [bbc.labels[i] for i in order[:640]]})  # fmt: skip
    frame[:400].to_csv(root / "train.csv", index=False)
    frame[400:].to_csv(root / "heldout.csv", index=False)
    coarse = frame[:400].assign(label=frame[:400].label.map(lambda s: "a" if s < "p" else s))
    coarse.to_csv(root / "other.csv", index=False)
    return root


def train(work: Path, name: str, *sets: str, data: str = "train.csv") -> Path:
    """A finished run of the `tiny` recipe on a CSV (extra --set overrides in `sets`)."""
    out = work / name
    if not out.exists():
        args = ["train", "tiny", "--out", str(out), *TINY, "--set", f"tasks.0.data={work / data}"]
        assert main([*args, *(x for s in sets for x in ("--set", s))]) == 0
    return out


@pytest.fixture(scope="module")
def runs(work: Path) -> dict[str, Path]:
    """tfidf-logreg, two tiny-bert runs (seeds 0 and 1), a tfidf run on other labels."""
    return {
        "tfidf": train(
            work, "tfidf", "model.backbone=tfidf-logreg", "train.eval_max_examples=null"
        ),
        "bert0": train(work, "bert0", "train.steps=6"),
        "bert1": train(work, "bert1", "train.steps=6", "train.seed=1"),
        "other": train(work, "other", "model.backbone=tfidf-logreg", data="other.csv"),
    }


# -- tfidf-logreg runs ------------------------------------------------------------------
def test_tfidf_run_directory_eval_and_predict(
    runs: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run-directory contract, no pickle in model/, eval == training's eval, predict."""
    run = runs["tfidf"]
    for name in ("recipe.yaml", "metrics.jsonl", "eval.json", "summary.json", "labels.json"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "model").iterdir()) == [
        "classic.json", "classic.safetensors"]  # fmt: skip
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train", "eval"} and rows[0].keys() >= {"step", "loss"}
    trained = json.loads((run / "eval.json").read_text())["tasks"]["bbc_news"]
    assert trained["accuracy"] > 0.8  # TF-IDF learns BBC topics from 360 articles
    code, out, _ = cli(["eval", str(run), "--json"], capsys)
    assert code == 0
    again = json.loads(out)["bbc_news"]
    assert again == pytest.approx(trained)  # the same 40 held-out rows, the same model
    code, out, _ = cli(["eval", str(run), "--data", str(work / "heldout.csv"), "--json"], capsys)
    assert code == 0 and json.loads(out)["bbc_news"]["examples"] == 240
    inputs = work / "in.jsonl"
    inputs.write_text('{"text": "shares in the bank fell after profits dropped"}\n')
    code, out, _ = cli(["predict", str(run), "--input", str(inputs)], capsys)
    assert code == 0 and json.loads(out)["label"] == "business"


def test_tfidf_bad_heads_and_modalities(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Regression heads and image data are one-line errors; nothing is written."""
    out = tmp_path / "r"
    base = ["train", "tiny", "--out", str(out), "--set", "model.backbone=tfidf-logreg"]
    code, _, err = cli([*base, "--set", "tasks.0.head=regression"], capsys)
    one_line_error(code, err, "tasks[0].head", "tfidf-logreg")
    code, _, err = cli([*base, "--set", "tasks.0.data=digits"], capsys)
    one_line_error(code, err, "tasks[0].data", "image", "text only")
    code, _, err = cli(["estimate", "tiny", "--set", "model.backbone=tfidf-logreg"], capsys)
    one_line_error(code, err, "model.backbone", "scikit-learn")
    assert not out.exists()


# -- ensembles ---------------------------------------------------------------------------
def test_heterogeneous_stack_spec_eval_predict(
    runs: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """tfidf + tiny-bert stacked: report before/after temperature; the spec evaluates and
    predicts like a run, on the test part of --data."""
    spec = work / "stack"
    code, out, _ = cli(["ensemble", str(runs["tfidf"]), str(runs["bert0"]), "--method", "stack",
                        "--data", str(work / "heldout.csv"), "--out", str(spec), "--json"],
                       capsys)  # fmt: skip
    assert code == 0
    report = json.loads(out)
    assert report["validation_examples"] == 120 and report["test_examples"] == 120
    for r in (*report["members"], report["ensemble"]):
        for part in ("before", "after"):
            assert set(r[part]) == {"accuracy", "macro_f1", "nll", "ece", "brier"}
        assert r["temperature"] > 0
    saved = json.loads((spec / "ensemble.json").read_text())
    assert saved["combiner"]["meta"]["kind"] == "logistic_regression"
    assert [m["task"] for m in saved["members"]] == ["bbc_news", "bbc_news"]
    code, out, _ = cli(["eval", str(spec), "--json"], capsys)
    assert code == 0
    ev = json.loads(out)["bbc_news"]
    assert ev["examples"] == 120
    assert ev["accuracy"] == pytest.approx(report["ensemble"]["after"]["accuracy"])
    assert ev["loss"] == pytest.approx(report["ensemble"]["after"]["nll"], rel=1e-4)
    inputs = work / "in2.jsonl"
    inputs.write_text('{"text": "the striker scored twice in the cup final"}\n')
    code, out, _ = cli(["predict", str(spec), "--input", str(inputs)], capsys)
    row = json.loads(out)
    assert (
        code == 0
        and row["label"] == "sports"
        and sum(row["probs"].values()) == pytest.approx(1, abs=1e-4)
    )


def test_product_spec_round_trip(
    runs: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--method product saves its pooling weights; the reloaded spec reproduces the
    reported test NLL."""
    spec = work / "product"
    code, _, err = cli(["ensemble", str(runs["tfidf"]), str(runs["bert0"]), "--method",
                        "product", "--data", str(work / "heldout.csv"), "--out", str(spec)],
                       capsys)  # fmt: skip
    assert code == 0, err
    saved = json.loads((spec / "ensemble.json").read_text())
    assert saved["combiner"]["method"] == "product"
    assert all(w >= 0 for w in saved["combiner"]["weights"])
    report = json.loads((spec / "eval.json").read_text())
    code, out, _ = cli(["eval", str(spec), "--json"], capsys)
    ev = json.loads(out)["bbc_news"]
    assert ev["loss"] == pytest.approx(report["ensemble"]["after"]["nll"], rel=1e-4)


def test_calibrated_members_round_trip(
    runs: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--calibrate-members stores each member's temperature; the reloaded spec reproduces
    the reported test metrics."""
    spec = work / "calibrated"
    code, _, err = cli(["ensemble", str(runs["tfidf"]), str(runs["bert0"]),
                        "--calibrate-members", "--data", str(work / "heldout.csv"),
                        "--out", str(spec)], capsys)  # fmt: skip
    assert code == 0, err
    saved = json.loads((spec / "ensemble.json").read_text())
    report = json.loads((spec / "eval.json").read_text())
    temps = [m["temperature"] for m in saved["members"]]
    assert temps == [m["temperature"] for m in report["members"]] and temps[0] != 1.0
    code, out, _ = cli(["eval", str(spec), "--json"], capsys)
    ev = json.loads(out)["bbc_news"]
    assert ev["loss"] == pytest.approx(report["ensemble"]["after"]["nll"], rel=1e-4)


def test_stacking_never_reads_test_labels(
    runs: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every test-part label of --data replaced by a wrong one: the saved spec (meta-learner,
    temperature) and its predictions are unchanged; only the reported test scores move."""
    frame = pd.read_csv(work / "heldout.csv")
    _, test_idx = split_indices(len(frame), 0.5, 0)
    names = sorted(frame.label.unique())
    corrupt = frame.copy()
    corrupt.loc[test_idx, "label"] = [names[(names.index(x) + 1) % 5]
                                      for x in frame.label[test_idx]]  # fmt: skip
    corrupt.to_csv(work / "corrupt.csv", index=False)
    specs = []
    for name, data in (("leak-a", "heldout.csv"), ("leak-b", "corrupt.csv")):
        code, _, err = cli(["ensemble", str(runs["tfidf"]), str(runs["bert0"]), "--method",
                            "stack", "--data", str(work / data), "--out", str(work / name)],
                           capsys)  # fmt: skip
        assert code == 0, err
        specs.append(json.loads((work / name / "ensemble.json").read_text()))
    a, b = specs
    assert a["combiner"] == b["combiner"] and a["temperature"] == b["temperature"]
    ra = json.loads((work / "leak-a" / "eval.json").read_text())["ensemble"]["before"]
    rb = json.loads((work / "leak-b" / "eval.json").read_text())["ensemble"]["before"]
    assert rb["accuracy"] < ra["accuracy"]  # the test labels really were corrupted
    table = load_run(work / "leak-a").eval_split("bbc_news")[0]
    pa = load_run(work / "leak-a").outputs("bbc_news", table)
    assert np.array_equal(pa, load_run(work / "leak-b").outputs("bbc_news", table))


def test_ensemble_of_one_equals_the_member(
    runs: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An ensemble of one run: identical report and, up to its temperature, outputs."""
    spec = work / "one"
    code, _, err = cli(["ensemble", str(runs["bert0"]), "--data", str(work / "heldout.csv"),
                        "--out", str(spec)], capsys)  # fmt: skip
    assert code == 0, err
    report = json.loads((spec / "eval.json").read_text())
    assert report["ensemble"] == {k: v for k, v in report["members"][0].items() if k != "run"}
    ens, member = load_run(spec), load_run(runs["bert0"])
    table, _ = ens.eval_split("bbc_news")
    from bitblend.tasks import calibration as cal

    want = cal.scale(cal.log_probs(cal.to_probs("classification",
                                                member.outputs("bbc_news", table))),
                     report["ensemble"]["temperature"])  # fmt: skip
    got = cal.to_probs("classification", ens.outputs("bbc_news", table))
    assert np.allclose(got, want, atol=1e-6)


def test_ensemble_bad_inputs(
    runs: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Different label spaces; a spec whose member run is gone: one line, exit 2."""
    held = str(work / "heldout.csv")
    out = work / "never"
    code, _, err = cli(["ensemble", str(runs["tfidf"]), str(runs["other"]), "--data", held,
                        "--out", str(out)], capsys)  # fmt: skip
    one_line_error(code, err, "other/labels.json", "label space")
    assert not out.exists()
    member = work / "bert0-copy"
    shutil.copytree(runs["bert0"], member)
    spec = work / "dangling"
    assert cli(["ensemble", str(member), "--data", held, "--out", str(spec)], capsys)[0] == 0
    shutil.rmtree(member)
    code, _, err = cli(["eval", str(spec)], capsys)
    one_line_error(code, err, "ensemble.json", "members[0]", "not found")


# -- merging -----------------------------------------------------------------------------
def _weights(run: Path) -> dict[str, torch.Tensor]:
    model = run / "model"
    return {**load_file(str(model / "model.safetensors")),
            **load_file(str(model / "heads.safetensors"))}  # fmt: skip


def test_merging_identical_runs_is_the_identity(
    runs: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """uniform, task-arithmetic (scale 1/n) and ties (density 1) of a run with itself."""
    src = _weights(runs["bert0"])
    for method, extra in (("uniform", []), ("task-arithmetic", []),
                          ("ties", ["--density", "1"])):  # fmt: skip
        out = work / f"self-{method}"
        code, _, err = cli(["merge", str(runs["bert0"]), str(runs["bert0"]), "--method", method,
                            *extra, "--out", str(out)], capsys)  # fmt: skip
        assert code == 0, err
        got = _weights(out)
        assert got.keys() == src.keys()
        for k, v in src.items():
            if method == "uniform":
                assert torch.equal(got[k], v), k
            else:
                assert torch.allclose(got[k], v, atol=1e-6), (method, k)
    table = load_run(runs["bert0"]).eval_split("bbc_news")[0]
    a = load_run(runs["bert0"]).outputs("bbc_news", table)
    assert np.array_equal(load_run(work / "self-uniform").outputs("bbc_news", table), a)


def test_uniform_soup_equals_the_hand_average(
    runs: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every merged tensor (trunk and head) is (a + b) / 2 of the two runs' saved weights."""
    out = work / "soup"
    code, _, err = cli(["merge", str(runs["bert0"]), str(runs["bert1"]), "--out", str(out)],
                       capsys)  # fmt: skip
    assert code == 0, err
    a, b, got = _weights(runs["bert0"]), _weights(runs["bert1"]), _weights(out)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    for k in a:
        assert torch.allclose(got[k], (a[k] + b[k]) / 2, atol=1e-7), k
    for name in ("recipe.yaml", "eval.json", "summary.json", "labels.json", "metrics.jsonl"):
        assert (out / name).is_file()
    assert cli(["eval", str(out), "--json"], capsys)[0] == 0


def test_greedy_soup_keeps_only_what_helps(
    runs: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ingredients ranked by held-out accuracy; the soup never scores below the best one."""
    out = work / "greedy"
    code, _, err = cli(["merge", str(runs["bert0"]), str(runs["bert1"]), "--method",
                        "greedy-soup", "--data", str(work / "heldout.csv"), "--out", str(out)],
                       capsys)  # fmt: skip
    assert code == 0, err
    info = json.loads((out / "summary.json").read_text())["merge"]
    accs = [i["accuracy"] for i in info["ingredients"]]
    assert accs == sorted(accs, reverse=True)
    assert info["kept"][0] == info["ingredients"][0]["run"]
    assert info["soup"]["accuracy"] >= accs[0]
    assert json.loads((out / "eval.json").read_text())["tasks"]["bbc_news"]["examples"] == 240


def test_merge_bad_inputs(
    runs: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Different architectures, a tfidf run, random-init runs with no common base."""
    gpt = train(work, "gpt", "train.steps=2", "model.backbone=tiny-gpt")
    code, _, err = cli(["merge", str(runs["bert0"]), str(gpt), "--out", str(work / "x")], capsys)
    one_line_error(code, err, "config.json", "model_type", "one architecture")
    code, _, err = cli(["merge", str(runs["bert0"]), str(runs["tfidf"]), "--out",
                        str(work / "x")], capsys)  # fmt: skip
    one_line_error(code, err, "merge needs transformer runs")
    code, _, err = cli(["merge", str(runs["bert0"]), str(runs["bert1"]), "--method", "ties",
                        "--out", str(work / "x")], capsys)  # fmt: skip
    one_line_error(code, err, "train.seed", "no common base")
    assert not (work / "x").exists()


# -- distillation ------------------------------------------------------------------------
def test_distill_from_an_ensemble_spec(
    runs: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tiny-bert student of a tfidf ensemble: the KD loss falls, the training loss falls,
    and the student agrees with its teacher more than at initialisation."""
    spec = work / "teacher"
    assert cli(["ensemble", str(runs["tfidf"]), "--data", str(work / "heldout.csv"),
                "--out", str(spec)], capsys)[0] == 0  # fmt: skip
    out = work / "student"
    code, _, err = cli(["distill", "--teacher", str(spec), "--student", "tiny", *TINY, "--set",
                        f"tasks.0.data={work / 'train.csv'}", "--set", "train.steps=40",
                        "--temperature", "2", "--alpha", "0.7", "--out", str(out)],
                       capsys)  # fmt: skip
    assert code == 0, err
    info = json.loads((out / "distill.json").read_text())
    task = info["per_task"]["bbc_news"]
    assert info["alpha"] == 0.7 and info["status"] == "done"
    assert task["kd_loss_last"] < task["kd_loss_first"]
    assert task["agreement_after"] > task["agreement_before"] + 0.1
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["split"] == "train"]  # fmt: skip
    assert np.mean(losses[-8:]) < np.mean(losses[:8])
    assert json.loads((out / "summary.json").read_text())["distill"]["per_task"] == info["per_task"]
    code, _, err = cli(["train", "--resume", str(out)], capsys)
    one_line_error(code, err, "distill --resume")


def test_distill_into_a_lora_student(
    runs: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A LoRA student (model.adapter.kind: lora) of a tiny-bert teacher: the KD loss falls,
    the student agrees with its teacher more than at initialisation, only the adapter and the
    head moved (the frozen base equals a fresh build of the same recipe), and the run saves
    peft's adapter layout so `eval` works on it."""
    out = work / "lora_student"
    code, _, err = cli(["distill", "--teacher", str(runs["bert0"]), "--student", "tiny", *TINY,
                        "--set", f"tasks.0.data={work / 'train.csv'}", "--set", "train.steps=30",
                        "--set", "model.adapter.kind=lora", "--set", "train.seed=5",
                        "--set", "optimizer.lr=5e-3", "--out", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    task = json.loads((out / "distill.json").read_text())["per_task"]["bbc_news"]
    assert task["kd_loss_last"] < task["kd_loss_first"]
    assert task["agreement_after"] > task["agreement_before"]
    assert (out / "model" / "adapter" / "adapter_config.json").exists()
    # The frozen base: the student's saved backbone equals that of a 1-step run of the same
    # recipe and seed (the base never moves, so both are the initial weights).
    init = work / "lora_init"
    code, _, err = cli(["train", "tiny", *TINY, "--set", f"tasks.0.data={work / 'train.csv'}",
                        "--set", "model.adapter.kind=lora", "--set", "train.seed=5",
                        "--set", "train.steps=1", "--out", str(init)], capsys)  # fmt: skip
    assert code == 0, err
    trained, fresh = (load_file(d / "model" / "model.safetensors") for d in (out, init))
    assert trained.keys() == fresh.keys()
    for name in trained:
        assert torch.equal(trained[name], fresh[name]), name
    code, _, err = cli(["eval", str(out), "--data", str(work / "heldout.csv")], capsys)
    assert code == 0, err


def test_distill_bad_inputs(
    runs: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A teacher with another label space, a tfidf student: one line, exit 2."""
    base = ["distill", "--student", "tiny", *TINY, "--out", str(work / "y")]
    code, _, err = cli([*base, "--teacher", str(runs["other"]), "--set",
                        f"tasks.0.data={work / 'train.csv'}"], capsys)  # fmt: skip
    one_line_error(code, err, "--teacher", "does not match")
    code, _, err = cli([*base, "--teacher", str(runs["tfidf"]), "--set",
                        "model.backbone=tfidf-logreg"], capsys)  # fmt: skip
    one_line_error(code, err, "--student", "soft targets")
    assert not (work / "y").exists()
