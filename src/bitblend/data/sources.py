"""A task's data: resolve its source, keep the modalities it uses, split, map labels.

Sources are built-ins (`data/builtin.py`), CSV / JSONL / Parquet files (read through
`datasets`, offline), HF `save_to_disk` directories, image and audio folders. The result is a
`TaskData` whose targets are already numbers in the form the task's head needs.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitblend.config.schema import TaskConfig
from bitblend.data.table import SourceData, Table, is_missing, numeric_matrix
from bitblend.errors import BitblendError, cut, quote

log = logging.getLogger(__name__)

FILE_TYPES = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
LM_HEADS = ("masked_lm", "causal_lm")


@dataclass
class TaskData:
    """Train and eval tables of one task, with targets mapped for its head."""

    train: Table
    eval: Table
    train_targets: np.ndarray
    eval_targets: np.ndarray
    label_names: list[str] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)
    source: str = ""
    synthetic: bool = False
    # A streamed task (data/streaming.py): its train table is only a sample of the stream.
    stream: Any = None
    skipped: int = 0  # rows skipped at load by data_errors: skip (sharded sources)
    skip_note: str | None = None  # the first such row's one-line message


def load_table(path: Path, where: str) -> Any:
    """A CSV / JSONL / Parquet file as a `datasets.Dataset` (offline, cached as Arrow)."""
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise BitblendError(
            f"{where}: {path}: expected a .csv, .jsonl, .json or .parquet file, an HF "
            "save_to_disk directory, an image folder, or a built-in source"
        )
    if not path.is_file():
        raise BitblendError(f"{where}: {path}: file not found")
    import datasets

    datasets.disable_progress_bars()
    # datasets logs parse failures itself; we report them once, in our own one line.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps the parser's error; report the innermost one
        while exc.__cause__ is not None or exc.__context__ is not None:
            exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        # The parsers' own words ("Instruction "train" corresponds to no data!", "Trailing
        # data at position 27") name neither the cause nor the line: look at the file.
        raise BitblendError(
            explain_parse_failure(path, kind)
            or f"{path}: cannot parse as {path.suffix[1:]} ({cut(first)})"
        ) from None


def explain_parse_failure(path: Path, kind: str) -> str | None:
    """What is wrong with a file the parser rejected, naming the line; None if not found.

    Runs only after a failure, so reading the file again costs nothing on good data.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return f"{path}: cannot read ({exc.strerror})"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        return (
            f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save it as UTF-8"
        )
    if not text.strip():
        want = "a header line and data rows" if kind == "csv" else "one JSON object per line"
        return f"{path}: the file is empty; expected {want}"
    if kind == "csv":
        rows = [r for r in csv.reader(text.splitlines()) if any(c.strip() for c in r)]
        if len(rows) <= 1:
            return f"{path}: no data rows, only a header line"
        return None
    if kind != "json":
        return None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"{path}: line {exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})"
        return f"{path}: no rows (an empty list)" if doc == [] else None
    lines = [(i, ln) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    for i, ln in lines:
        try:
            json.loads(ln)
        except json.JSONDecodeError as exc:
            return (
                f"{path}: line {i}: invalid JSON ({exc.msg}, column {exc.colno}); expected one "
                "JSON object per line"
            )
    return None


# The command-line options of `eval` and `predict` that name a file's columns (a missing
# column's hint names the option of the command in hand, never a key it cannot set).
COLUMN_OPTIONS = {
    "text_column": "--text-column",
    "label_column": "--label-column",
    "image_column": "--image-column",
    "audio_column": "--audio-column",
    "feature_columns": "--feature-columns",
}


def table_from_columns(
    cols: dict[str, list[Any]],
    task: TaskConfig,
    path: str,
    where: str,
    labelled: bool = True,
    options: dict[str, str] | None = None,
) -> Table:
    """Pick text / image / tabular / label columns of a user file and check every row.

    A missing column's hint: the command's option when `options` maps the key to one, the
    recipe key when `where` is a recipe path (tasks[i]), else what the run reads."""
    names = list(cols)

    def hint(key: str) -> str:
        if options and key in options:
            return f"pass {options[key]} NAME"
        if where.startswith("tasks["):
            return f"set {where}.{key}"
        return f"rename the column to the one {where} was trained on ({key})"

    def need(col: str, key: str) -> list[Any]:
        if col not in cols:
            raise BitblendError(
                f"{path}: column {col!r} not found (columns: {', '.join(names)}); {hint(key)}"
            )
        return cols[col]

    unlabelled = task.head in LM_HEADS or not labelled
    n = len(next(iter(cols.values()), []))
    labels = [None] * n if unlabelled else need(task.label_column, "label_column")
    for i, y in enumerate(labels):
        if not unlabelled and is_missing(y):
            number = where if task.head == "regression" else None
            raise BitblendError(_missing_cell(path, i, task.label_column, number))
    want = _wanted(task, has_text=task.text_column in cols, has_image=task.image_column is not None,
                   has_tab=task.feature_columns is not None,
                   has_audio=task.audio_column is not None)  # fmt: skip
    text = image = tabular = audio = None
    if "text" in want:
        text = need(task.text_column, "text_column")
        for i, t in enumerate(text):
            ok = (
                isinstance(t, str) and t.strip()
                if task.head != "token_classification"
                else (isinstance(t, list) and len(t) > 0)
            )
            if not ok:
                msg = _missing_cell(path, i, task.text_column, None) if is_missing(t) else ""
                if msg.endswith("missing value"):  # `NA` in the file, not an empty cell
                    raise BitblendError(msg)
                raise BitblendError(
                    f"{path}: row {i + 1}: column {task.text_column!r} is empty or not "
                    + ("a list of words" if task.head == "token_classification" else "text")
                )
    if "image" in want:
        from bitblend.data.images import load_images

        paths = need(task.image_column or "image", "image_column")
        base = Path(path).parent  # relative image paths are relative to the data file
        image = load_images([base / str(p) for p in paths], task.image_size)
    if "audio" in want:
        from bitblend.data.audio import load_audios

        clips = need(task.audio_column or "audio", "audio_column")
        base = Path(path).parent  # relative audio paths are relative to the data file
        audio = load_audios(
            [None if is_missing(p) else base / str(p) for p in clips], task.sample_rate
        )
    if "tabular" in want:
        feats = task.feature_columns or [
            c
            for c in names
            if c not in (task.label_column, task.text_column, task.image_column, task.audio_column)
        ]
        tabular = numeric_matrix([(c, need(c, "feature_columns")) for c in feats], path)
    return Table(labels=list(labels), text=text, image=image, tabular=tabular, audio=audio,
                 audio_rate=task.sample_rate, rows=np.arange(n))  # fmt: skip


def _missing_cell(path: str, i: int, column: str, number: str | None) -> str:
    """The message for a cell the reader returned as missing (row i, 0-based); `number`
    names the task (`tasks[0]`) when the cell must hold a regression target.

    The CSV reader (pandas) turns `NA`, `n/a`, `null`, `None`, `nan`... into missing values,
    so a cell the user sees filled can arrive empty: quote what the file really holds.
    """
    where = f"{path}: row {i + 1}: column {column!r}"
    raw = _raw_csv_cell(Path(path), i, column) if path.lower().endswith(".csv") else None
    if not raw:
        return f"{where} is empty"
    if number:
        return (
            f"{path}: row {i + 1}: label {quote(raw)} is not a number ({number}.head is regression)"
        )
    return f"{where} is {quote(raw)}, which the CSV reader takes for a missing value"


def _raw_csv_cell(path: Path, i: int, column: str) -> str | None:
    """The text of data row i (0-based) in `column` of a CSV file, as written."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader)
            k = header.index(column)
            for j, row in enumerate(r for r in reader if r):
                if j == i:
                    return row[k].strip() if k < len(row) else None
    except (OSError, UnicodeDecodeError, ValueError, StopIteration, csv.Error):
        return None
    return None


def _wanted(
    task: TaskConfig, *, has_text: bool, has_image: bool, has_tab: bool, has_audio: bool
) -> set[str]:
    if task.modality == "text" or task.head in LM_HEADS or task.head == "token_classification":
        return {"text"}
    if task.modality == "image":
        return {"image"}
    if task.modality == "tabular":
        return {"tabular"}
    if task.modality == "audio":
        return {"audio"}
    pairs = (("text", has_text), ("image", has_image), ("tabular", has_tab), ("audio", has_audio))
    found = {m for m, ok in pairs if ok}
    return found or {"text"}


def _select(table: Table, task: TaskConfig, where: str, source: str) -> Table:
    """Keep only the modalities the task asks for (`modality: auto` keeps all)."""
    have = set(table.modalities)
    if task.modality == "auto":
        want = have
        if task.head in LM_HEADS or task.head == "token_classification":
            want = {"text"}
    elif task.modality == "multimodal":
        want = have
        if len(have) < 2:
            raise BitblendError(
                f"{where}.modality: multimodal needs a source with several modalities; "
                f"{source} has {', '.join(sorted(have))}"
            )
    else:
        want = {task.modality}
    missing = want - have
    if missing:
        raise BitblendError(
            f"{where}.modality: {source} has no {', '.join(sorted(missing))} data "
            f"(it has {', '.join(sorted(have))})"
        )
    return Table(
        labels=table.labels,
        text=table.text if "text" in want else None,
        image=table.image if "image" in want else None,
        tabular=table.tabular if "tabular" in want else None,
        audio=table.audio if "audio" in want else None,
        audio_rate=table.audio_rate,
        rows=table.rows,
    )


def _user_source(task: TaskConfig, path: Path, where: str) -> SourceData:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            from bitblend.data.hfdisk import load_hf_disk

            return load_hf_disk(path, task.text_column, task.label_column, task.feature_columns)
        from bitblend.data.audio import is_audio_folder, load_audio_folder

        if is_audio_folder(path):
            return load_audio_folder(path, task.sample_rate)
        from bitblend.data.images import load_image_folder

        return load_image_folder(path, task.image_size)
    ds = load_table(path, where)
    cols = {c: ds[c] for c in ds.column_names}
    label = task.label_column
    if label in cols and type(ds.features[label]).__name__ == "Json":
        cols[label] = _raw_json_labels(path, label, cols[label])
    return SourceData(train=table_from_columns(cols, task, str(path), where.rsplit(".", 1)[0]),
                      feature_names=list(task.feature_columns or []))  # fmt: skip


def _raw_json_labels(path: Path, column: str, decoded: list[Any]) -> list[Any]:
    """The label column of a JSON file whose values mix types, as the file writes them.

    `datasets` stores such a column as JSON text and decodes every string again, so "1"
    arrives as 1 and "[1]" as a list. Read the values as written instead. A label is its
    text (as in CSV, where 1 and "1" cannot differ): 1 and "1" are one class, with a warning.
    """
    text = path.read_text(encoding="utf-8-sig")
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    except json.JSONDecodeError:
        return decoded
    if len(records) != len(decoded) or not all(isinstance(r, dict) for r in records):
        return decoded
    raw = [r.get(column) for r in records]
    numbers = {str(v) for v in raw if isinstance(v, int | float) and not isinstance(v, bool)}
    same = sorted(numbers & {v for v in raw if isinstance(v, str)})
    if same:
        log.warning(
            "%s: column %r holds both the number %s and the text %s; a label is its text, so "
            "they are one class",
            path,
            column,
            cut(same[0], 40),
            quote(same[0]),
        )
    return raw


def label_names_for(
    task: TaskConfig, train: Table, hint: list[str] | None, where: str
) -> list[str]:
    """The class order of a classification-like head (sorted, numbers numerically)."""
    if task.head in ("regression", *LM_HEADS):
        return []
    if task.head == "multilabel":
        found = {str(v) for y in train.labels for v in _as_list(y)}
    elif task.head == "token_classification":
        found = {str(v) for y in train.labels for v in y}
    else:
        found = {str(y) for y in train.labels}
    names = [n for n in hint if n in found] if hint else sorted(found, key=_label_sort_key)
    if not hint and task.head == "binary" and found <= {"0", "1", "False", "True", "0.0", "1.0"}:
        names = sorted(found, key=_label_sort_key)
    need = 2 if task.head in ("classification", "binary") else 1
    if len(names) < need:
        raise BitblendError(
            f"{where}: column {task.label_column!r} has {len(names)} distinct label(s); a "
            f"{task.head} task needs at least {need}"
        )
    if task.head == "binary" and len(names) != 2:
        raise BitblendError(
            f"{where}: a binary task needs exactly 2 labels, found {len(names)} "
            f"({', '.join(names[:5])}); use head: classification"
        )
    return names


def _as_list(y: Any) -> list[Any]:
    if isinstance(y, list | tuple | np.ndarray):
        return list(y)
    return [v for v in str(y).split("|") if v]  # "a|b" also names several labels


def map_targets(table: Table, head: str, names: list[str], path: str, where: str) -> np.ndarray:
    """Labels -> the array a head trains on (see EncodedSplit.targets)."""
    n = len(table)
    if head in LM_HEADS:
        return np.zeros(n, dtype=np.float32)
    if head == "regression":
        out = np.zeros(n, dtype=np.float32)
        for i, y in enumerate(table.labels):
            try:
                out[i] = float(y)
            except (TypeError, ValueError):
                raise BitblendError(
                    f"{path}: row {table.row(i)}: label {quote(y)} is not a number ({where}.head "
                    "is regression)"
                ) from None
            if not math.isfinite(out[i]):
                raise BitblendError(f"{path}: row {table.row(i)}: label {quote(y)} is not finite")
        return out
    index = {name: k for k, name in enumerate(names)}

    def lookup(i: int, y: Any) -> int:
        key = str(y)
        if key not in index:
            raise BitblendError(
                f"{path}: row {table.row(i)}: label {quote(key)} does not occur in the training "
                f"data (labels: {', '.join(cut(n, 40) for n in names[:20])})"
            )
        return index[key]

    if head == "multilabel":
        hot = np.zeros((n, len(names)), dtype=np.float32)
        for i, y in enumerate(table.labels):
            for v in _as_list(y):
                hot[i, lookup(i, v)] = 1.0
        return hot
    if head == "token_classification":
        tags = np.empty(n, dtype=object)
        for i, y in enumerate(table.labels):
            tags[i] = [lookup(i, v) for v in y]
            if table.text is not None and len(tags[i]) != len(table.text[i]):
                raise BitblendError(
                    f"{path}: row {table.row(i)}: {len(tags[i])} tags for "
                    f"{len(table.text[i])} words"
                )
        return tags
    ids = np.asarray([lookup(i, y) for i, y in enumerate(table.labels)], dtype=np.int64)
    return ids.astype(np.float32) if head == "binary" else ids


def _label_sort_key(name: str) -> tuple[int, float, str]:
    # Numeric labels sort numerically (so 0..9 keep their ids), others alphabetically.
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def load_task_data(task: TaskConfig, index: int, seed: int) -> TaskData:
    """Load, check, split and label-map the data of `task` (the recipe's tasks[index])."""
    where = f"tasks[{index}]"
    from bitblend.data.builtin import BUILTINS, load_builtin

    sharded = None if task.data in BUILTINS else _sharded(task, where, seed)
    if isinstance(sharded, TaskData):
        return sharded
    skips: list[str] = []
    if task.data in BUILTINS:
        src = load_builtin(task.data)
        source = task.data
    elif sharded is not None:
        (src, skips), source = sharded, task.data
    else:
        path = Path(task.data)
        if not path.exists() and path.suffix.lower() not in FILE_TYPES:
            raise BitblendError(
                f"{where}.data: {task.data}: expected one of {', '.join(BUILTINS)}, or an "
                "existing file or directory"
            )
        src = _user_source(task, path, f"{where}.data")
        source = str(path.resolve())
    full = _select(src.train, task, where, task.data)
    if len(full) == 0:
        raise BitblendError(f"{task.data}: the dataset is empty")
    if full.rows is None:  # built-ins: the position in the source is the row id, so a split
        full.rows = np.arange(len(full))  # says which source rows it holds (baselines check it)
    rng = np.random.default_rng([seed, 7919])  # split RNG: independent of the training order
    if task.eval_data is not None:
        ev_src = _user_source(task, Path(task.eval_data), f"{where}.eval_data")
        eval_table, train_table = _select(ev_src.train, task, where, task.eval_data), full
    elif src.eval is not None:
        eval_table, train_table = _select(src.eval, task, where, task.data), full
    else:
        order = rng.permutation(len(full))
        n_eval = max(1, round(len(order) * task.eval_fraction))
        if len(order) - n_eval < 1:
            raise BitblendError(f"{task.data}: too few examples ({len(order)}) to split for eval")
        eval_table, train_table = full.take(order[:n_eval]), full.take(order[n_eval:])
    if task.max_examples is not None and task.max_examples < len(train_table):
        train_table = train_table.take(
            np.sort(rng.permutation(len(train_table))[: task.max_examples])
        )
    names = label_names_for(task, train_table, src.label_names, task.data)
    eval_path = task.eval_data or task.data
    return TaskData(
        skipped=len(skips),
        skip_note=skips[0] if skips else None,
        train=train_table,
        eval=eval_table,
        train_targets=map_targets(train_table, task.head, names, task.data, where),
        eval_targets=map_targets(eval_table, task.head, names, eval_path, where),
        label_names=names,
        feature_names=src.feature_names,
        source=source,
        synthetic=src.synthetic,
    )


def read_inputs(path: Path, task: TaskConfig) -> Table:
    """Inputs of a JSONL/CSV/Parquet file for `predict` (no label column needed)."""
    ds = load_table(path, "--input")
    cols = {c: ds[c] for c in ds.column_names}
    return table_from_columns(
        cols, task, str(path), "--input", labelled=False, options=COLUMN_OPTIONS
    )


def _sharded(
    task: TaskConfig, where: str, seed: int
) -> TaskData | tuple[SourceData, list[str]] | None:
    """A sharded or streamed source: TaskData of a stream, SourceData of shards read whole
    (a directory or glob of shards under the streaming threshold) with the rows skipped,
    or None (not sharded: the loaders above read it)."""
    from bitblend.data import streaming as st

    path = Path(task.data)
    kind = None
    if st.is_glob(task.data) and not path.exists():
        kind = "glob"
    elif path.is_dir():
        if st.is_hf_dir(path):
            kind = "hf"
        else:  # shards and no images (an image folder may hold a stray README.txt)
            from bitblend.data.images import EXTENSIONS

            files = [p for p in path.rglob("*") if p.is_file()]
            if any(st.shard_kind(p) for p in files) and not any(
                p.suffix.lower() in EXTENSIONS for p in files
            ):
                kind = "dir"
    elif path.is_file() and st.shard_kind(path) in ("jsonl", "text", "parquet"):
        kind = "file"
    if kind is None:
        return None
    shards = st.find_shards(task.data, f"{where}.data")
    stream = task.streaming
    if stream is None:
        big = st.total_bytes(shards) > task.stream_threshold_mb * 2**20
        stream = big and task.head in LM_HEADS
    if stream:
        return _stream_task_data(task, where, seed, shards)
    if kind in ("hf", "file"):
        return None  # one file or a save_to_disk directory, not streamed: read as before
    rows, skipped = st.read_all(shards, task.text_column, task.data_errors)
    cols: dict[str, list[Any]] = {}
    for row in rows:  # columns of the first row decide; later rows may lack optional ones
        for k in cols or row:
            cols.setdefault(k, []).append(row.get(k))
    if not rows:
        raise BitblendError(f"{task.data}: the dataset is empty")
    table = table_from_columns(cols, task, task.data, where)
    return SourceData(train=table, feature_names=list(task.feature_columns or [])), skipped


def _stream_task_data(task: TaskConfig, where: str, seed: int, shards: list[Path]) -> TaskData:
    """A streamed task: the held-out eval rows and a train sample in memory, the rest lazy."""
    from bitblend.data import streaming as st

    if task.head not in LM_HEADS:
        raise BitblendError(
            f"{where}.streaming: streamed data serves masked_lm / causal_lm tasks; a "
            f"{task.head} task reads its data in memory (set streaming: false)"
        )
    # Fail before the run on what opening each shard shows; with data_errors: skip the
    # stream itself counts what it skips (counting the preflight's finds too would be twice).
    st.preflight(shards, task.text_column, task.data_errors)
    n_eval = 0 if task.eval_data is not None else task.stream_eval_rows
    held = st.hold_out(shards[0], task.text_column, n_eval, 256, task.data_errors)
    if task.eval_data is not None:
        ev_src = _user_source(task, Path(task.eval_data), f"{where}.eval_data")
        eval_table = _select(ev_src.train, task, where, task.eval_data)
    elif held.eval_rows:
        eval_table = _rows_table(held.eval_rows, task, where)
    else:
        raise BitblendError(
            f"{where}: no eval rows: the first shard {shards[0]} gave none (stream_eval_rows "
            f"{task.stream_eval_rows}); set eval_data or stream_eval_rows"
        )
    sample = held.sample or held.eval_rows
    per_shard = [_estimate(p, task) for p in shards]
    source = st.StreamSource(
        shards, task.text_column, seed, task.shuffle_buffer, task.data_errors,
        holdout=held.raw, estimate=max(1, sum(per_shard) - held.raw), label=task.data,
    )  # fmt: skip
    return TaskData(
        train=_rows_table(sample, task, where),
        eval=eval_table,
        train_targets=np.zeros(len(sample), dtype=np.float32),
        eval_targets=np.zeros(len(eval_table), dtype=np.float32),
        source=task.data,
        stream=source,
    )


def _estimate(path: Path, task: TaskConfig) -> int:
    """Rows of a shard (0 for an unreadable one that data_errors: skip passes over)."""
    from bitblend.data.streaming import ShardFile

    try:
        return ShardFile(path, task.text_column).estimate_rows()
    except BitblendError:
        if task.data_errors != "skip":
            raise
        return 0


def _rows_table(rows: list[dict[str, Any]], task: TaskConfig, where: str) -> Table:
    """Text rows of a language-model task as a Table."""
    cols = {task.text_column: [r[task.text_column] for r in rows]}
    return table_from_columns(cols, task, where, where)
