"""The catalogue of bad inputs: every case, how to run it, and docs/errors.md rendered from it.

Each case writes its files into an empty directory, runs `bitblend ARGV` there (in-process
through `bitblend.cli.main`, or as a real subprocess) and must end in exit code 2, exactly one
line on stderr, no traceback, and no file created, changed or removed (the shared finished
run `RUN` included). `tests/unit/test_error_catalogue.py` asserts all of that plus the exact
message recorded in docs/errors.md; `python benchmarks/errors_doc.py` rewrites the page.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
PREFIX = "bitblend: error: "
RUN = "RUN"  # placeholder in argv for the shared finished run directory
# Train options that keep a case that wrongly passes validation short.
TINY = ["--set", "train.steps=1", "--set", "train.batch_size=2", "--quiet", "--out", "out"]
TASK = "tasks:\n  - name: t\n    data: bbc_news\n"
Files = dict[str, str | bytes]


@dataclass(frozen=True)
class Case:
    """One bad input: files to write, the command, and what it shows."""

    id: str
    section: str
    what: str  # the bad input, in words
    argv: list[str]
    files: Files = field(default_factory=dict)
    setup: Callable[[Path, Path], None] | None = None  # (case dir, shared run) -> more files
    needs_run: bool = False  # uses the shared finished run (argv names it as RUN)
    subprocess: bool = False  # run the real `python -m bitblend.cli`, not main() in-process
    slow: bool = False


def _csv(n: int, label: Callable[[int], str] = lambda i: "ab"[i % 2]) -> str:
    return "text,label\n" + "".join(f"text {i},{label(i)}\n" for i in range(1, n + 1))


def _jsonl(n: int) -> str:
    return "".join(f'{{"text": "text {i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(n))


def _bomb(levels: int, key: str) -> str:
    """A "billion laughs" recipe: `key` holds `levels` of nine aliases each (9**levels)."""
    parts = ['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        parts.append(f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    section, name = key.split(".")
    return f"{section}:\n  {name}: [{', '.join(parts)}]\n{TASK}"


def _poison_copy(tmp: Path, run: Path) -> None:
    """tmp/nan-run: the shared run with NaN task-head weights (what a diverged run saves)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(run, tmp / "nan-run", ignore=shutil.ignore_patterns("checkpoints"))
    heads = tmp / "nan-run" / "model" / "heads.safetensors"
    weights = load_file(str(heads))
    for tensor in weights.values():
        tensor.fill_(float("nan"))
    save_file(weights, str(heads))


def _train(case: str, section: str, what: str, args: list[str], files: Files | None = None,
           **kw: object) -> Case:  # fmt: skip
    return Case(case, section, what, ["train", *args, *TINY], files or {}, **kw)  # type: ignore[arg-type]


def _data(case: str, what: str, files: Files, *sets: str, **kw: object) -> Case:
    """A train case on the tiny recipe with the data file `d.*` of `files` as tasks[0].data."""
    data = next(iter(files), "nope.csv")
    args = ["tiny", "--set", f"tasks.0.data={data}"]
    for s in sets:
        args += ["--set", s]
    return _train(case, "data", what, args, files, **kw)


R = "r.yaml"
# A streamed masked-LM task on the tiny recipe (tasks.0.data set by each case).
STREAM = ["tiny", "--set", "tasks.0.head=masked_lm", "--set", "tasks.0.streaming=true"]
# fmt: off
CASES: list[Case] = [
    # -- recipes (validate checks them; train, estimate and doctor load them the same way) --
    Case("recipe-unknown-key", "recipe", "a misspelt key", ["validate", R],
         {R: TASK + "model:\n  backbon: tiny-bert\n"}),
    Case("recipe-unknown-section", "recipe", "an unknown top-level section", ["validate", R],
         {R: TASK + "trian:\n  steps: 3\n"}),
    Case("recipe-bad-enum", "recipe", "a value outside a key's choices", ["validate", R],
         {R: "tasks:\n  - name: t\n    data: bbc_news\n    head: clf\n"}),
    Case("recipe-bad-type", "recipe", "text where an integer belongs", ["validate", R],
         {R: TASK + "model:\n  max_length: ten\n"}),
    Case("recipe-missing-required", "recipe", "a task without its required `data`", ["validate", R],
         {R: "tasks:\n  - name: t\n"}),
    Case("recipe-not-mapping", "recipe", "a YAML list instead of a mapping", ["validate", R],
         {R: "- name: t\n"}),
    Case("recipe-malformed", "recipe", "broken indentation", ["validate", R],
         {R: "model:\n  backbone: tiny-bert\n  max_length: 16\n bad: x\n"}),
    Case("recipe-not-utf8", "recipe", "a Latin-1 byte in a comment", ["validate", R],
         {R: TASK.encode() + b"# caf\xe9\n"}),
    Case("recipe-file-missing", "recipe", "a recipe path that does not exist",
         ["validate", "missing.yaml"]),
    Case("recipe-unknown-builtin", "recipe", "neither a file nor a built-in name",
         ["validate", "no-such-recipe"]),
    Case("recipe-lr-nan", "recipe", "`optimizer.lr: .nan`", ["validate", R],
         {R: TASK + "optimizer:\n  lr: .nan\n"}),
    Case("recipe-lr-inf", "recipe", "`optimizer.lr: .inf`", ["validate", R],
         {R: TASK + "optimizer:\n  lr: .inf\n"}),
    Case("recipe-lr-zero", "recipe", "a learning rate of 0", ["validate", R],
         {R: TASK + "optimizer:\n  lr: 0\n"}),
    Case("recipe-dropout-nan", "recipe", "NaN in an optional number", ["validate", R],
         {R: TASK + "model:\n  dropout: .nan\n"}),
    Case("recipe-alias-bomb", "recipe", "a YAML alias bomb (9 levels of 9 aliases)",
         ["validate", R], {R: _bomb(9, "model.backbone")}),
    Case("recipe-alias-value", "recipe", "6,561 values by aliases where a number belongs",
         ["validate", R], {R: _bomb(3, "model.max_length")}),
    Case("recipe-alias-self", "recipe", "an alias inside the value it names", ["validate", R],
         {R: "name: x\ntasks: &t\n  - name: t\n    data: *t\n"}),
    Case("recipe-deep-nesting", "recipe", "lists nested 1,000 deep", ["validate", R],
         {R: "name: " + "[" * 1000 + "]" * 1000 + "\n" + TASK}),
    Case("recipe-no-tasks", "recipe", "an empty task list", ["validate", R], {R: "tasks: []\n"}),
    Case("recipe-task-name", "recipe", "a task name with a space", ["validate", R],
         {R: "tasks:\n  - name: my task\n    data: bbc_news\n"}),
    Case("recipe-task-duplicate", "recipe", "two tasks with one name", ["validate", R],
         {R: TASK + "  - name: t\n    data: digits\n"}),
    Case("recipe-loss-head", "recipe", "a loss the head cannot use", ["validate", R],
         {R: "tasks:\n  - name: t\n    data: diabetes\n    head: regression\n"
             "    loss: cross_entropy\n"}),
    Case("recipe-eval-fraction", "recipe", "`eval_fraction: 1.5`", ["validate", R],
         {R: TASK + "    eval_fraction: 1.5\n"}),
    Case("recipe-weight-negative", "recipe", "a negative task weight", ["validate", R],
         {R: TASK + "    weight: -1\n"}),
    Case("recipe-steps-zero", "recipe", "`train.steps: 0`", ["validate", R],
         {R: TASK + "train:\n  steps: 0\n"}),
    Case("recipe-betas", "recipe", "one Adam beta instead of two", ["validate", R],
         {R: TASK + "optimizer:\n  betas: [0.9]\n"}),
    Case("recipe-dropout-range", "recipe", "`model.dropout: 1.5`", ["validate", R],
         {R: TASK + "model:\n  dropout: 1.5\n"}),
    Case("recipe-stuck-steps", "recipe", "`precision.stuck_steps: -1`", ["validate", R],
         {R: TASK + "precision:\n  stuck_steps: -1\n"}),
    Case("recipe-mixing-weights", "recipe", "strategy weights without weights", ["validate", R],
         {R: TASK + "mixing:\n  strategy: weights\n"}),
    Case("recipe-mixing-weights-task", "recipe", "a weight for a task that does not exist",
         ["validate", R], {R: TASK + "mixing:\n  strategy: weights\n  weights: {t: 1, u: 1}\n"}),
    Case("recipe-balancing-batches", "recipe", "upgrad balancing with per-task batches",
         ["validate", R], {R: TASK + "mixing:\n  balancing: upgrad\n  batches: homogeneous\n"}),
    Case("set-no-equals", "recipe", "`--set` without `=`",
         ["validate", "tiny", "--set", "train.steps"]),
    Case("set-bad-index", "recipe", "`--set` past the end of the task list",
         ["validate", "tiny", "--set", "tasks.3.weight=2"]),
    Case("set-into-value", "recipe", "`--set` below a plain value",
         ["validate", "tiny", "--set", "name.x=1"]),
    Case("set-bad-type", "recipe", "`--set` with text for an integer",
         ["validate", "tiny", "--set", "train.eval_every=ten"]),
    Case("set-alias-bomb", "recipe", "an alias bomb inside a `--set` value",
         ["validate", "tiny", "--set", "name=" + _bomb(9, "x.y").split(": ", 1)[1].split("\n")[0]]),
    Case("set-deep-nesting", "recipe", "lists nested 1,000 deep in a `--set` value",
         ["validate", "tiny", "--set", "name=" + "[" * 1000 + "]" * 1000]),
    _train("train-rounding", "recipe", "stochastic rounding on fp32 weights",
           ["tiny", "--set", "precision.rounding=stochastic"]),
    _train("train-max-length", "recipe", "`model.max_length` past the backbone's 512 positions",
           ["tiny", "--set", "model.max_length=100000"]),
    _train("train-pad-multiple", "recipe", "512 tokens padded to a multiple of 100",
           ["tiny", "--set", "model.max_length=512", "--set", "train.pad_to_multiple_of=100"]),
    _train("train-causal-on-encoder", "recipe", "a causal_lm head on a BERT backbone",
           ["tiny", "--set", "tasks.0.head=causal_lm"]),
    _train("train-packing-pooled", "recipe", "packing on a classification task",
           ["tiny", "--set", "tasks.0.packing=true"]),
    _train("train-llama-vocab", "recipe", "a llama BPE vocabulary smaller than its special tokens",
           ["tiny-gpt", "--set", "model.backbone=llama-tiny", "--set", "model.vocab_size=100"]),
    _train("train-llama-positions", "recipe", "a max_length beyond a llama's 2048 positions",
           ["tiny-gpt", "--set", "model.backbone=llama-tiny", "--set", "model.max_length=4096"]),
    # -- data files ------------------------------------------------------------------------
    _data("data-not-found", "a data path that does not exist", {}),
    *[  # streamed shards (data/streaming.py): a directory `d` of shards, the bad one named
        _train(f"stream-{cid}", "data", what, [*STREAM, "--set", "tasks.0.data=d"],
               {"d/a.jsonl": first, **({f"d/b.{ext}": bad} if ext else {})})
        for cid, what, first, ext, bad in [
            ("empty-shard", "an empty shard among streamed shards", _jsonl(4), "jsonl", ""),
            ("corrupt-parquet", "a Parquet shard that is not Parquet", _jsonl(4), "parquet",
             b"PAR1 not parquet"),
            ("not-json", "a JSONL line that is not JSON", _jsonl(2) + "{oops\n", None, ""),
            ("no-text-column", "a shard without the text column", _jsonl(4), "jsonl",
             '{"body": "x"}\n'),
        ]
    ],
    _data("data-extension", "a .txt file", {"d.txt": "hello\n"}),
    _data("data-no-text-column", "no `text` column", {"d.csv": "body,label\nhi,a\nyo,b\n"}),
    _data("data-no-label-column", "no `label` column", {"d.csv": "text,y\nhi,a\nyo,b\n"}),
    _data("data-empty-label", "an empty label cell", {"d.csv": "text,label\nhi,a\nyo,\nok,b\n"}),
    _data("data-na-label", "`N/A` as a label", {"d.csv": "text,label\nhi,a\nyo,N/A\nok,b\n"}),
    _data("data-empty-text", "an empty text cell", {"d.csv": 'text,label\nhi,a\n"",b\nok,b\n'}),
    _data("data-na-text", "the text `NA`", {"d.csv": "text,label\nhi,a\nNA,b\nok,b\n"}),
    _data("data-regression-text", "`high` as a regression target",
          {"d.csv": _csv(10, lambda i: "high" if i == 4 else f"{i}.5")}, "tasks.0.head=regression"),
    _data("data-regression-na", "`n/a` as a regression target",
          {"d.csv": _csv(10, lambda i: "n/a" if i == 4 else f"{i}.5")}, "tasks.0.head=regression"),
    _data("data-empty-csv", "an empty CSV file", {"d.csv": ""}),
    _data("data-header-only", "a CSV with only its header line", {"d.csv": "text,label\n"}),
    _data("data-empty-jsonl", "an empty JSONL file", {"d.jsonl": ""}),
    _data("data-empty-json-list", "a JSON file holding `[]`", {"d.json": "[]\n"}),
    _data("data-jsonl-broken-line", "a JSONL line with an unquoted key",
          {"d.jsonl": _jsonl(2) + '{"text": "c", label: "a"}\n' + _jsonl(2)}),
    _data("data-json-broken", "a JSON list missing a comma",
          {"d.json": '[{"text": "a", "label": "x"},\n {"text": "b" "label": "y"}]\n'}),
    _data("data-csv-not-utf8", "a Latin-1 CSV", {"d.csv": b"text,label\nok,a\ncaf\xe9,b\n"}),
    _data("data-csv-open-quote", "an unterminated quote", {"d.csv": 'text,label\n"oops,a\nb,b\n'}),
    _data("data-tabular-inf", "`inf` in a feature column",
          {"d.csv": "f1,f2,label\n1,2,a\ninf,3,b\n4,5,a\n6,7,b\n"}, "tasks.0.modality=tabular"),
    _data("data-tabular-huge", "a feature past float32's range",
          {"d.csv": "f1,f2,label\n1,2,a\n1e39,3,b\n4,5,a\n6,7,b\n"}, "tasks.0.modality=tabular"),
    _data("data-tabular-text", "text in a feature column",
          {"d.csv": "f1,f2,label\n1,2,a\nlots,3,b\n4,5,a\n6,7,b\n"}, "tasks.0.modality=tabular"),
    _data("data-one-class", "a single distinct label", {"d.csv": _csv(10, lambda i: "a")}),
    _data("data-binary-three", "three labels for a binary head",
          {"d.csv": _csv(12, lambda i: "abc"[i % 3])}, "tasks.0.head=binary"),
    _data("data-eval-unseen-label", "an eval label that training never saw",
          {"d.csv": _csv(10), "e.csv": _csv(3, lambda i: "c")}, "tasks.0.eval_data=e.csv"),
    _data("data-too-few-rows", "one row: nothing left to train on after the eval split",
          {"d.csv": "text,label\nhi,a\n"}),
    _data("data-fewer-than-batch", "fewer training rows than one batch", {"d.csv": _csv(6)},
          "tasks.0.batch_size=16"),
    _data("data-modality", "an image task on a text-only file", {"d.csv": _csv(6)},
          "tasks.0.modality=image"),
    # -- run directories -------------------------------------------------------------------
    Case("out-not-empty", "run directory", "`--out` naming a directory with files",
         ["train", "tiny", "--out", "old"], {"old/metrics.jsonl": '{"step": 1}\n'}),
    Case("out-is-file", "run directory", "`--out` naming a file", ["train", "tiny", "--out", "f"],
         {"f": "a file\n"}),
    Case("resume-not-a-run", "run directory", "`--resume` of a directory without recipe.yaml",
         ["train", "--resume", "stuff"], {"stuff/notes.txt": "hi\n"}),
    Case("resume-missing", "run directory", "`--resume` of a path that does not exist",
         ["train", "--resume", "nowhere"]),
    Case("resume-with-recipe", "run directory", "`--resume` together with a recipe",
         ["train", "tiny", "--resume", RUN], needs_run=True),
    # -- the command line ------------------------------------------------------------------
    Case("usage-unknown-flag", "command line", "an unknown option", ["train", "--bogus"]),
    Case("usage-unknown-verb", "command line", "an unknown command", ["fly"]),
    Case("usage-no-verb", "command line", "no command at all", []),
    Case("usage-predict-no-input", "command line", "predict without `--input`", ["predict", RUN],
         needs_run=True),
    Case("usage-predict-precision", "command line", "an unknown `--precision` for predict",
         ["predict", RUN, "--input", "in.jsonl", "--precision", "fp64"], needs_run=True),
    Case("usage-iters-text", "command line", "text for an integer option",
         ["bench-infer", RUN, "--iters", "many"], needs_run=True),
    Case("estimate-ranks", "command line", "`estimate --ranks 0`",
         ["estimate", "tiny", "--ranks", "0"]),
    Case("estimate-tfidf", "command line", "`estimate` of a scikit-learn recipe",
         ["estimate", "tiny", "--set", "model.backbone=tfidf-logreg"]),
    Case("doctor-batches", "command line", "`doctor --batches 0`",
         ["doctor", "tiny", "--batches", "0"]),
    Case("bench-infer-precision", "command line", "an unknown serving precision",
         ["bench-infer", RUN, "--precision", "fp64"], needs_run=True),
    Case("bench-infer-batch-sizes", "command line", "batch sizes that are not integers",
         ["bench-infer", RUN, "--batch-sizes", "1,x"], needs_run=True),
    Case("bench-infer-iters", "command line", "`--iters 0`", ["bench-infer", RUN, "--iters", "0"],
         needs_run=True),
    Case("distill-no-teacher", "command line", "distill without `--teacher`",
         ["distill", "--student", "tiny"]),
    Case("distill-resume-and-teacher", "command line", "distill `--resume` with `--teacher`",
         ["distill", "--resume", RUN, "--teacher", RUN], needs_run=True),
    # -- finished runs: eval, predict, ensemble, merge, report ----------------------------
    Case("eval-not-a-run", "finished runs", "eval of a directory that is not a run",
         ["eval", "stuff"], {"stuff/notes.txt": "hi\n"}),
    Case("generate-no-causal-task", "finished runs",
         "generate with a run that has no causal_lm task",
         ["generate", RUN, "--prompt", "hi"], needs_run=True),
    Case("generate-top-p", "finished runs", "`--top-p 0` for generate",
         ["generate", RUN, "--top-p", "0"], needs_run=True),
    Case("eval-unfinished-run", "finished runs", "eval of a run without model/", ["eval", "half"],
         {"half/recipe.yaml": TASK}),
    Case("eval-unknown-task", "finished runs", "`--task` the run does not have",
         ["eval", RUN, "--task", "nope"], needs_run=True),
    Case("eval-data-missing", "finished runs", "`--data` that does not exist",
         ["eval", RUN, "--data", "nope.csv"], needs_run=True),
    Case("eval-data-no-label", "finished runs", "`--data` without the label column",
         ["eval", RUN, "--data", "e.csv"], {"e.csv": "text\nhello\n"}, needs_run=True),
    Case("eval-data-unseen-label", "finished runs", "`--data` with a label the run never saw",
         ["eval", RUN, "--data", "e.csv"], {"e.csv": "text,label\nhello,weather\n"},
         needs_run=True),
    Case("predict-output-exists", "finished runs", "`--output` that already exists",
         ["predict", RUN, "--input", "in.jsonl", "--output", "preds.jsonl"],
         {"in.jsonl": '{"text": "hello"}\n', "preds.jsonl": '{"old": true}\n'}, needs_run=True),
    Case("predict-input-missing", "finished runs", "`--input` that does not exist",
         ["predict", RUN, "--input", "nope.jsonl"], needs_run=True),
    Case("predict-input-no-text", "finished runs", "`--input` without a text column",
         ["predict", RUN, "--input", "in.jsonl"], {"in.jsonl": '{"body": "hello"}\n'},
         needs_run=True),
    Case("predict-input-empty", "finished runs", "an empty `--input`",
         ["predict", RUN, "--input", "in.csv"], {"in.csv": ""}, needs_run=True),
    Case("predict-input-broken", "finished runs", "a broken line in `--input`",
         ["predict", RUN, "--input", "in.jsonl"], {"in.jsonl": '{"text": "a"}\n{"text": b}\n'},
         needs_run=True),
    Case("predict-nan-output", "finished runs", "a run whose weights are NaN",
         ["predict", "nan-run", "--input", "in.jsonl", "--output", "p.jsonl"],
         {"in.jsonl": '{"text": "hello"}\n'}, setup=_poison_copy, needs_run=True),
    Case("ensemble-not-a-run", "finished runs", "an ensemble member that is not a run",
         ["ensemble", "stuff", "--data", "e.csv"], {"stuff/x": "", "e.csv": _csv(8)}),
    Case("ensemble-val-fraction", "finished runs", "`--val-fraction 2`",
         ["ensemble", RUN, RUN, "--data", "e.csv", "--val-fraction", "2"],
         {"e.csv": "text,label\n" + "".join(f"t {i},tech\n" for i in range(8))}, needs_run=True),
    Case("merge-not-a-run", "finished runs", "merging a directory that is not a run",
         ["merge", "stuff", "stuff"], {"stuff/x": ""}),
    Case("report-not-a-run", "finished runs", "a report over a directory that is not a run",
         ["report", "stuff"], {"stuff/x": ""}),
    # -- the real command in a subprocess (library warnings would show up on stderr) -------
    Case("subprocess-bad-data", "subprocess", "no `text` column, through `python -m`",
         ["train", "tiny", "--set", "tasks.0.data=d.csv", *TINY],
         {"d.csv": "body,label\nhi,a\nyo,b\n"}, subprocess=True, slow=True),
    Case("subprocess-alias-bomb", "subprocess", "an alias bomb, through `python -m`",
         ["validate", R], {R: _bomb(9, "model.backbone")}, subprocess=True, slow=True),
    Case("subprocess-usage", "subprocess", "an unknown option, through `python -m`",
         ["train", "--bogus"], subprocess=True, slow=True),
    Case("subprocess-predict-nan", "subprocess", "NaN outputs, through `python -m`",
         ["predict", "nan-run", "--input", "in.jsonl"], {"in.jsonl": '{"text": "hello"}\n'},
         setup=_poison_copy, needs_run=True, subprocess=True, slow=True),
]
# fmt: on


# -- running a case ----------------------------------------------------------------------


@dataclass
class Outcome:
    """What a case did: exit code, stdout, stderr, and the files before and after."""

    code: int
    out: str
    err: str
    before: dict[str, tuple[str, int]]
    after: dict[str, tuple[str, int]]

    @property
    def message(self) -> str:
        """The first stderr line (the whole of it, when the case holds)."""
        return (self.err.splitlines() or [""])[0]


def snapshot(*roots: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file, and every directory (as ""), under `roots`."""
    out: dict[str, tuple[str, int]] = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            st = p.stat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            out[str(p)] = (digest, st.st_mtime_ns if p.is_file() else 0)
    return out


def prepare_run(path: Path) -> Path:
    """A tiny finished run (2 steps of the `tiny` recipe) that read-only cases share."""
    from bitblend.cli import main

    argv = ["train", "tiny", "--quiet", "--out", str(path)]
    for s in ("train.steps=2", "train.batch_size=4", "tasks.0.max_examples=32",
              "train.eval_max_examples=8"):  # fmt: skip
        argv += ["--set", s]
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"preparing the shared run failed with exit code {code}")
    return path


def write_files(tmp: Path, files: Files) -> None:
    """The case's files under `tmp` (folders as needed)."""
    for name, content in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def normalise(text: str, tmp: Path, run: Path | None) -> str:
    """Paths of this machine -> the names the catalogue shows."""
    if run is not None:
        text = text.replace(str(run), RUN)
    return text.replace(str(tmp) + os.sep, "").replace(str(tmp), ".")


@contextlib.contextmanager
def _in_dir(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _in_process(argv: list[str]) -> tuple[int, str, str]:
    from bitblend.cli import main

    out, err = io.StringIO(), io.StringIO()
    # main() configures logging only when nothing has; a handler on the captured stderr
    # stands in for its stderr handler, so a stray warning shows up as a second line.
    handler = logging.StreamHandler(err)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse usage errors exit instead of returning
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        logging.getLogger().removeHandler(handler)
    return code, out.getvalue(), err.getvalue()


def _subprocess(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "bitblend.cli", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout, proc.stderr


def run_case(case: Case, tmp: Path, run: Path | None) -> Outcome:
    """Write the case's files into the empty directory `tmp`, run it there, snapshot both."""
    if case.needs_run and run is None:
        raise ValueError(f"{case.id} needs the shared run")
    write_files(tmp, case.files)
    if case.setup is not None:
        assert run is not None
        case.setup(tmp, run)
    argv = [str(run) if a == RUN and run is not None else a for a in case.argv]
    roots = [tmp, run] if run is not None else [tmp]
    before = snapshot(*roots)
    with _in_dir(tmp):
        code, out, err = _subprocess(argv, tmp) if case.subprocess else _in_process(argv)
    after = snapshot(*roots)
    return Outcome(code, out, normalise(err, tmp, run), before, after)


# -- the page ------------------------------------------------------------------------------

HEADER = """\
# Error catalogue

Every bad input below ends the same way: exit code 2, **one line** on stderr starting with
`bitblend: error:`, no traceback (`bitblend --debug ...` shows one), and nothing on disk
created, changed or removed — an existing run directory stays byte-identical. `RUN` stands
for a finished run directory; other paths are files the case writes first.

This page is generated: `python benchmarks/errors_doc.py` runs every case of
`tests/error_catalogue.py` and rewrites it, and `tests/unit/test_error_catalogue.py` fails
when a message here differs from what the command prints.

Numeric faults during training are not bad input and are not listed here: a run whose steps
are all non-finite stops after `precision.stuck_steps` steps with one error line naming the
first module that went non-finite (after the per-step warnings), and `predict` refuses to
write non-finite outputs (case `predict-nan-output`).
"""


def render(messages: dict[str, str]) -> str:
    """docs/errors.md from the case table and each case's message."""
    tiny = shlex.join(TINY)
    parts = [HEADER, f"\n{len(CASES)} cases. `+ TINY` stands for `{tiny}`.\n"]
    section = None
    for case in CASES:
        if case.section != section:
            section = case.section
            parts.append(f"\n## {section}\n")
        argv, tail = case.argv, ""
        if argv[-len(TINY) :] == TINY:  # the options every train case adds
            argv, tail = argv[: -len(TINY)], " + TINY"
        command = shlex.join(["bitblend", *argv])
        if len(command) > 160:  # the bombs: the file or value is what the case says
            command = command[:100] + f"... ({len(command)} characters)"
        command += tail
        parts.append(
            f"\n### {case.id}\n\n{case.what}\n\n    $ {command}\n    {messages[case.id]}\n"
        )
    return "".join(parts)


def parse(text: str) -> dict[str, str]:
    """Case id -> message, from a rendered page."""
    out: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("### "):
            current = line[4:].strip()
        elif current and line.startswith("    ") and not line.startswith("    $ "):
            out[current] = line[4:]
            current = None
    return out
