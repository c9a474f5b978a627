"""bitblend serve: a real server on a free loopback port serving a tiny-bert run trained a
few steps here. Predictions equal `bitblend predict`, concurrent requests share forwards,
bad requests get a one-line 4xx and the server keeps serving, a full queue answers 503."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import make_recipe
from tests.integration.test_trainer import _train
from tests.serve_helpers import gauge, histogram, running, write_rows
from tests.unit.test_cli_errors import run_cli

TEXTS = [
    "shares fell as the bank cut interest rates again",
    "the striker scored twice in the second half",
    "a new film festival opens in london",
    "parliament votes on the budget tonight",
    "the phone maker unveiled a faster chip",
    "oil prices",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT on BBC News, trained 3 steps in fp32."""
    run = tmp_path_factory.mktemp("serve") / "run"
    _train(make_recipe("train.steps=3", "train.eval_max_examples=16"), run)
    return run


@pytest.fixture(scope="module")
def torch_run(tiny_run: Path) -> Any:
    """The tiny run loaded as `bitblend serve` loads it (torch, the run's precision)."""
    from bitblend.serve.server import load_engine

    return load_engine(tiny_run, "run", "torch")


def cli_predict(run: Path, rows: list[dict[str, Any]], tmp: Path, *extra: str) -> list[Any]:
    """What `bitblend predict` writes for these rows."""
    from bitblend.cli import main

    inp = write_rows(tmp / "in.jsonl", rows)
    out = tmp / "out.jsonl"
    assert main(["predict", str(run), "--input", str(inp), "--output", str(out), *extra]) == 0
    return [json.loads(x) for x in out.read_text().splitlines()]


def probs(preds: list[dict[str, Any]]) -> np.ndarray:
    """(n, C) probabilities of predictions in label order."""
    return np.array([[p["probs"][k] for k in sorted(p["probs"])] for p in preds])


def test_single_and_list_requests_equal_cli_predict(
    tiny_run: Path, torch_run: Any, tmp_path: Path
) -> None:
    """One object -> one prediction, a list -> a list; both exactly `bitblend predict`'s."""
    rows = [{"text": t} for t in TEXTS]
    expected = cli_predict(tiny_run, rows, tmp_path)
    with running(torch_run) as (url, _):
        got = httpx.post(f"{url}/v1/predict", json=rows, timeout=60).json()
        one = httpx.post(f"{url}/v1/predict", json={"text": TEXTS[0], "task": "bbc"}).json()
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert got == expected
    assert isinstance(one, dict) and one["task"] == "bbc"
    assert one["label"] == expected[0]["label"]
    np.testing.assert_allclose(probs([one]), probs(expected[:1]), atol=1e-5)


def test_concurrent_requests_share_a_forward(torch_run: Any) -> None:
    """16 single-row requests that arrive while a forward runs are answered from fewer
    forwards (batch > 1 in the batch-size histogram), each with its own row's prediction.
    The inference thread is held until all 16 have arrived: a lone request runs at once
    (no max-wait), so batches form while the model is busy, as they do under load."""
    with running(torch_run, max_wait_ms=300, max_batch=32) as (url, service):
        gate = threading.Event()
        assert service.batcher is not None
        blocker = service.batcher.executor.submit(gate.wait, 60)  # the model is busy
        with cf.ThreadPoolExecutor(16) as pool:
            futures = [
                pool.submit(
                    httpx.post, f"{url}/v1/predict", json={"text": TEXTS[i % 6]}, timeout=60
                )
                for i in range(16)
            ]
            # One batch may be handed to the held thread; the rest wait in the queue.
            _wait_for(
                lambda: (
                    service.metrics.in_flight.value
                    + gauge(httpx.get(f"{url}/metrics").text, "bitblend_queue_depth")
                    >= 15
                )
            )
            gate.set()
            blocker.result()
            answers = [f.result() for f in futures]
        alone = httpx.post(f"{url}/v1/predict", json=[{"text": t} for t in TEXTS]).json()
        hist = histogram(httpx.get(f"{url}/metrics").text, "bitblend_batch_rows")
    assert [a.status_code for a in answers] == [200] * 16
    # Warm-up forwards are not counted; the 16 rows and the list of 6 ran in fewer batches.
    assert hist["sum"] == 16 + 6
    assert hist["count"] < 16 and hist["1"] < hist["count"], hist
    for i, a in enumerate(answers):
        assert a.json()["label"] == alone[i % 6]["label"]
        # Padding to a batch's longest row changes fp32 sums in the last bits only.
        np.testing.assert_allclose(probs([a.json()]), probs([alone[i % 6]]), atol=1e-4)


BAD = [
    (b'{"text": ', 400, "not valid JSON"),
    (b"[]", 400, "non-empty list"),
    (b'"just text"', 400, "JSON object"),
    (b"[1, 2]", 400, "row 1: expected a JSON object"),
    (b'{"txt": "no text column"}', 400, "column 'text' not found"),
    (b'{"text": "x", "task": "nope"}', 400, "task 'nope': expected one of bbc"),
    (b'{"text": ""}', 400, "empty or not text"),
    (b'{"text": "' + b"x" * 5000 + b'"}', 413, "limit"),
]


def test_bad_requests_get_one_line_4xx_and_the_next_good_one_succeeds(torch_run: Any) -> None:
    """Malformed JSON, wrong shapes, a missing column, an unknown task, an empty text and an
    oversized body: each a 4xx with one JSON line naming the problem; serving goes on."""
    with running(torch_run, max_body_bytes=4096) as (url, _):
        for body, status, needle in BAD:
            r = httpx.post(f"{url}/v1/predict", content=body)
            assert r.status_code == status, (body[:40], r.text)
            err = r.json()["error"]
            assert needle in err and "\n" not in err, err
            good = httpx.post(f"{url}/v1/predict", json={"text": TEXTS[0]})
            assert good.status_code == 200 and good.json()["task"] == "bbc"
        r = httpx.get(f"{url}/v1/predict")
        assert r.status_code == 405 and "error" in r.json()
        text = httpx.get(f"{url}/metrics").text
    assert f'bitblend_requests_total{{code="400"}} {len(BAD) - 1}' in text
    assert 'bitblend_requests_total{code="413"} 1' in text


def test_a_full_queue_answers_503_with_retry_after(torch_run: Any) -> None:
    """With the inference thread held and one request queued (max_queue 1), the next gets
    503 + Retry-After at once; released, the held ones complete."""
    with running(torch_run, max_queue=1, max_batch=1, max_wait_ms=0) as (url, service):
        gate = threading.Event()
        assert service.batcher is not None
        blocker = service.batcher.executor.submit(gate.wait, 60)  # occupies the one thread
        with cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/predict", json={"text": "a"}, timeout=60)
            # The first request's batch is handed to the held thread (in flight, not queued).
            _wait_for(lambda: service.metrics.in_flight.value == 1)
            second = pool.submit(httpx.post, f"{url}/v1/predict", json={"text": "b"}, timeout=60)
            _wait_for(lambda: gauge(httpx.get(f"{url}/metrics").text, "bitblend_queue_depth") == 1)
            third = httpx.post(f"{url}/v1/predict", json={"text": "c"}, timeout=10)
            assert third.status_code == 503
            assert third.headers["retry-after"] == "1" and "queue is full" in third.json()["error"]
            gate.set()
            blocker.result()
            assert first.result().status_code == 200
            assert second.result().status_code == 200


def _wait_for(cond: Any, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("engine", "precision", "reference", "atol"),
    [
        ("torch", "fp32", "fp32", 1e-6),
        ("torch", "bf16", "bf16", 1e-6),
        ("torch", "int8", "int8", 1e-6),
        ("onnxruntime", "fp32", "fp32", 1e-4),
        ("onnxruntime", "int8", "fp32", 5e-2),
    ],
)
def test_every_engine_and_precision_equals_predict(
    tiny_run: Path, tmp_path: Path, engine: str, precision: str, reference: str, atol: float
) -> None:
    """Each engine x precision answers what `bitblend predict --precision P` writes: the
    same numbers for torch, fp32 ORT within 1e-4 of torch fp32, int8 ORT within 0.05."""
    from bitblend.serve.server import load_engine

    rows = [{"text": t} for t in TEXTS]
    expected = cli_predict(tiny_run, rows, tmp_path, "--precision", reference)
    with running(load_engine(tiny_run, precision, engine)) as (url, _):
        got = httpx.post(f"{url}/v1/predict", json=rows, timeout=60).json()
    np.testing.assert_allclose(probs(got), probs(expected), atol=atol)
    if atol <= 1e-4:
        assert [g["label"] for g in got] == [e["label"] for e in expected]


@pytest.mark.slow
def test_an_ensemble_spec_serves_like_predict(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A saved ensemble spec (tfidf-logreg + the tiny BERT, mean) is just another run for
    the server: the same answers as `bitblend predict SPEC`."""
    from bitblend.data.builtin import load_builtin
    from bitblend.serve.server import load_engine

    bbc = load_builtin("bbc_news").train
    assert bbc.text is not None
    held = tmp_path / "held.jsonl"
    write_rows(held, [{"text": bbc.text[i][:400], "label": bbc.labels[i]} for i in range(40)])
    tfidf, spec = tmp_path / "tfidf", tmp_path / "spec"
    argv = ["train", "tiny", "--out", str(tfidf), "--quiet", "--set", "model.backbone=tfidf-logreg"]
    assert run_cli(argv, capsys)[0] == 0
    argv = ["ensemble", str(tfidf), str(tiny_run), "--method", "mean", "--data", str(held),
            "--out", str(spec)]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    rows = [{"text": t} for t in TEXTS]
    expected = cli_predict(spec, rows, tmp_path)
    with running(load_engine(spec)) as (url, _):
        got = httpx.post(f"{url}/v1/predict", json=rows, timeout=60).json()
    assert got == expected


def test_serve_and_export_bad_arguments_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing run, a bf16 ONNX engine and a port in use end in one line and exit 2."""
    from bitblend.serve.server import bind
    from tests.unit.test_cli_errors import assert_one_line_error

    code, _, err = run_cli(["serve", str(tmp_path / "nope"), "--port", "0"], capsys)
    assert_one_line_error(code, err, "not a bitblend run directory")
    code, _, err = run_cli(["export", str(tmp_path / "nope")], capsys)
    assert_one_line_error(code, err, "not a bitblend run directory")
    argv = ["serve", str(tmp_path), "--engine", "onnxruntime", "--precision", "bf16", "--port", "0"]
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, "--precision bf16", "onnxruntime")
    taken = bind("127.0.0.1", 0)
    try:
        port = str(taken.getsockname()[1])
        code, _, err = run_cli(["serve", str(tmp_path), "--port", port], capsys)
        assert_one_line_error(code, err, f"--port {port}", "cannot listen")
    finally:
        taken.close()
    code, _, err = run_cli(["serve", str(tmp_path), "--max-batch", "0"], capsys)
    assert_one_line_error(code, err, "--max-batch")


def test_a_gathered_batch_is_padded_by_length_bucket(torch_run: Any) -> None:
    """Short rows and one long row run as two forwards (<= 16 tokens, and the long one's
    class), not one padded to the long row; outputs come back in row order, equal to
    each row's own forward."""
    from bitblend.data.table import Table
    from bitblend.serve.buckets import bucketed, length_buckets

    assert [g.tolist() for g in length_buckets(np.array([5, 40, 16, 17, 3]))] == [
        [0, 2, 4], [3], [1],
    ]  # fmt: skip
    seqs: list[int] = []
    hook = torch_run.model.register_forward_hook(
        lambda m, args, kwargs, out: seqs.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    long = " ".join(TEXTS * 3)
    table = Table(labels=[None] * 4, text=[TEXTS[0], long, TEXTS[1], TEXTS[5]])
    try:
        out = bucketed(torch_run, torch_run)("bbc", table)
        alone = [torch_run.outputs("bbc", table.take([i])) for i in range(4)]
    finally:
        hook.remove()
    assert len(seqs[:2]) == 2 and max(seqs[:2]) > 16 >= min(seqs[:2]), seqs
    np.testing.assert_allclose(out, np.concatenate(alone), atol=1e-5)


@pytest.mark.slow
def test_auto_engine_is_the_fastest_within_the_accuracy_bound(
    tiny_run: Path, tmp_path: Path
) -> None:
    """`--engine auto` serves ONNX Runtime int8 when the export's int8 eval accuracy is
    within the bound of fp32's, else torch bf16 when its eval accuracy (measured at start)
    is, else torch in the run's precision; answers equal `predict` / the int8 graph in the
    chosen engine. `export --int8` records both eval accuracies."""
    import shutil

    from bitblend.runs.load import load_transformer_run
    from bitblend.serve.onnx import MANIFEST, export_onnx
    from bitblend.serve.server import default_engine, load_engine

    run = tmp_path / "run"  # a copy: the export and the edited manifest stay in it
    shutil.copytree(tiny_run, run)
    rows = [{"text": t} for t in TEXTS]
    predictor, engine, precision, why = default_engine(run, bound=1.0)
    assert (engine, precision) == ("onnxruntime", "int8"), why
    assert (run / "onnx" / MANIFEST).is_file()  # exported once, reused by the next start
    with running(predictor) as (url, _):
        got = httpx.post(f"{url}/v1/predict", json=rows, timeout=60).json()
    with running(load_engine(run, "int8", "onnxruntime")) as (url, _):
        expected = httpx.post(f"{url}/v1/predict", json=rows, timeout=60).json()
    np.testing.assert_allclose(probs(got), probs(expected), atol=1e-6)
    # An export whose int8 graph trails fp32 by more than the bound: torch bf16.
    path = run / "onnx" / MANIFEST
    manifest = json.loads(path.read_text())
    for entry in manifest["tasks"].values():
        entry["int8_eval_accuracy"] = entry["fp32_eval_accuracy"] - 0.5
    path.write_text(json.dumps(manifest))
    predictor, engine, precision, why = default_engine(run, bound=0.4)
    assert (engine, precision) == ("torch", "bf16"), why
    assert "onnxruntime int8 50.00 points below fp32" in why
    with running(predictor) as (url, _):
        got = httpx.post(f"{url}/v1/predict", json=rows, timeout=60).json()
    expected = cli_predict(run, rows, tmp_path, "--precision", "bf16")
    np.testing.assert_allclose(probs(got), probs(expected), atol=1e-6)
    # A bound no engine can meet (accuracy would have to rise): torch, the run's own.
    _, engine, precision, why = default_engine(run, bound=-1.0)
    assert (engine, precision) == ("torch", "run") and "bf16 eval accuracy" in why
    # An export that cannot be written (here RUN_DIR/onnx is a file): torch bf16, and why.
    shutil.rmtree(run / "onnx")
    (run / "onnx").write_text("not a directory")
    _, engine, precision, why = default_engine(run, bound=1.0)
    assert (engine, precision) == ("torch", "bf16") and "int8 not available" in why, why
    fp32 = load_transformer_run(tiny_run, "fp32")
    entry = export_onnx(fp32, tmp_path / "onnx-export", int8=True, check_rows=8)["tasks"]["bbc"]
    assert entry["eval_rows"] > 0
    assert 0.0 <= entry["int8_eval_accuracy"] <= 1.0
    assert 0.0 <= entry["fp32_eval_accuracy"] <= 1.0


@pytest.mark.slow
def test_an_export_from_other_weights_is_made_again(tiny_run: Path, tmp_path: Path) -> None:
    """ensure_export reuses RUN_DIR/onnx only when it was written by this exporter from the
    run's current model/ files; otherwise the graphs are exported again."""
    import os
    import shutil

    from bitblend.runs.load import load_transformer_run
    from bitblend.serve.onnx import EXPORTER, MANIFEST, ensure_export

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "onnx", ignore_errors=True)
    fp32 = load_transformer_run(run, "fp32")
    first = ensure_export(fp32, int8=False)
    assert first["exporter"] == EXPORTER
    written = (run / "onnx" / MANIFEST).stat().st_mtime_ns
    assert ensure_export(fp32, int8=False) == first  # current: reused as it is
    assert (run / "onnx" / MANIFEST).stat().st_mtime_ns == written
    weights = next((run / "model").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    again = ensure_export(fp32, int8=False)  # the model changed: exported again
    assert again["model"] != first["model"]
    assert (run / "onnx" / MANIFEST).stat().st_mtime_ns != written
