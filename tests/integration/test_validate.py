"""`bitblend validate` catches, in seconds and without training, what `train` would reject
(#22 item 6); `--schema-only` keeps the old recipe-only check."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

import bitblend.train.validate  # noqa: F401  (imported here: import time is not validate's)
from tests.unit.test_cli_errors import assert_one_line_error, run_cli, write

ROWS = "".join(f"a short text number {i},{'ab'[i % 2]}\n" for i in range(40))


def _csv(tmp: Path, name: str = "d.csv", body: str = ROWS, header: str = "text,label") -> Path:
    return write(tmp / name, f"{header}\n{body}")


def _recipe(tmp: Path, data: Path, *task_lines: str, backbone: str = "tiny-bert") -> Path:
    extra = "".join(f"    {line}\n" for line in task_lines)
    return write(
        tmp / "r.yaml",
        f"model:\n  backbone: {backbone}\n  max_length: 32\n"
        f"tasks:\n  - name: t\n    data: {data}\n{extra}"
        "train:\n  batch_size: 4\n",
    )


def missing_file(tmp: Path) -> tuple[Path, list[str]]:
    return _recipe(tmp, tmp / "nope.csv"), ["tasks[0].data", "nope.csv", "not found"]


def wrong_column(tmp: Path) -> tuple[Path, list[str]]:
    data = _csv(tmp, header="body,label")
    return _recipe(tmp, data), [str(data), "column 'text' not found"]


def wrong_label_column(tmp: Path) -> tuple[Path, list[str]]:
    data = _csv(tmp)
    return _recipe(tmp, data, "label_column: topic"), [str(data), "column 'topic' not found"]


def header_only_csv(tmp: Path) -> tuple[Path, list[str]]:
    data = _csv(tmp, body="")
    return _recipe(tmp, data), [str(data)]


def unseen_eval_label(tmp: Path) -> tuple[Path, list[str]]:
    data = _csv(tmp)
    ev = _csv(tmp, "eval.csv", body="one more text,a\nand another,zebra\n")
    return _recipe(tmp, data, f"eval_data: {ev}"), [str(ev), "'zebra'", "training data"]


def missing_backbone(tmp: Path) -> tuple[Path, list[str]]:
    r = _recipe(tmp, _csv(tmp), backbone=str(tmp / "no-model"))
    return r, ["model.backbone", "no-model"]


def too_long_for_positions(tmp: Path) -> tuple[Path, list[str]]:
    return _recipe(tmp, _csv(tmp), "max_length: 100000"), ["tasks[0]", "position embeddings"]


def fewer_rows_than_a_batch(tmp: Path) -> tuple[Path, list[str]]:
    r = _recipe(tmp, _csv(tmp), "batch_size: 4096")
    return r, ["tasks[0]", "fewer than one batch"]


def lm_head_on_encoder(tmp: Path) -> tuple[Path, list[str]]:
    return _recipe(tmp, _csv(tmp), "head: causal_lm"), ["tasks[0].head", "decoder"]


CASES: list[Callable[[Path], tuple[Path, list[str]]]] = [
    missing_file,
    wrong_column,
    wrong_label_column,
    header_only_csv,
    unseen_eval_label,
    missing_backbone,
    too_long_for_positions,
    fewer_rows_than_a_batch,
    lm_head_on_encoder,
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_validate_catches_what_train_would_reject_in_seconds(
    case: Callable[[Path], tuple[Path, list[str]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe, needles = case(tmp_path)
    # CPU seconds: this machine is shared, and its wall clock swings with the neighbours.
    t0 = time.process_time()
    code, out, err = run_cli(["validate", str(recipe)], capsys)
    assert time.process_time() - t0 < 10
    assert_one_line_error(code, err, *needles)  # the same line `train` prints
    assert out == ""
    # The schema alone is fine: --schema-only still says ok, as validate did before.
    code, out, err = run_cli(["validate", str(recipe), "--schema-only"], capsys)
    assert code == 0 and "ok (schema only)" in out, err


def test_validate_ok_names_what_it_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(tmp_path, _csv(tmp_path), "tokenizer: wordpiece", "wordpiece_vocab: 200")
    code, out, err = run_cli(["validate", str(recipe)], capsys)
    assert code == 0, err
    assert f"{recipe}: ok - tiny-bert" in out and "checked in" in out
    assert "t (classification): 36 train / 4 eval examples, 2 labels" in out
    assert "(own WordPiece)" in out
    assert not (tmp_path / "runs").exists()  # validate writes nothing
