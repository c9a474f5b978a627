"""Request bodies -> per-task tables: the rows `bitblend predict` reads from JSONL.

A body is one JSON object (a row) or a list of them. A row holds the task's input columns
(text, image, features, audio) and optionally "task" (needed when the run has several).
Images and audio clips are base64 data URIs (`data:image/png;base64,...`,
`data:audio/wav;base64,...`); file paths only under the server's
`--image-root` (a client must not make the server open arbitrary files). Every bad input
is a `RequestError`: a one-line message and an HTTP status, and the server keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitblend.data.sources import table_from_columns
from bitblend.data.table import Table
from bitblend.errors import BitblendError
from bitblend.runs.base import Predictor
from bitblend.runs.evaluate import check_predictable

TASK_KEY = "task"
INLINE_PARSE_BYTES = 64 * 1024  # bodies up to this parse on the event loop (no images)


class RequestError(BitblendError):
    """A bad request: `status` is the HTTP status (4xx) it is answered with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(" ".join(message.split()))  # always one line
        self.status = status


@dataclass
class Group:
    """The rows of one request that go to one task."""

    task: str
    positions: list[int]  # index of each row in the request body
    table: Table


@dataclass
class ParsedRequest:
    """A request body split by task; `single` when the body was one object, not a list."""

    single: bool
    size: int
    groups: list[Group]


def _rows(body: bytes) -> tuple[bool, list[dict[str, Any]]]:
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise RequestError(
            f"body: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})"
        ) from None
    except UnicodeDecodeError:
        raise RequestError("body: not UTF-8 text") from None
    if isinstance(data, dict):
        return True, [data]
    if not isinstance(data, list) or not data:
        raise RequestError("body: expected a JSON object (one row) or a non-empty list of rows")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise RequestError(
                f"body: row {i + 1}: expected a JSON object, got {type(row).__name__}"
            )
    return False, data


def _task_of(run: Predictor, row: dict[str, Any], i: int) -> str:
    name = row.get(TASK_KEY)
    names = [t.name for t in run.tasks]
    if name is None:
        if len(names) > 1:
            raise RequestError(f"row {i + 1}: task: this run has several tasks; expected one "
                               f"of {', '.join(names)}")  # fmt: skip
        name = names[0]
    if not isinstance(name, str) or name not in names:
        raise RequestError(f"row {i + 1}: task {name!r}: expected one of {', '.join(names)}")
    try:
        check_predictable(run, name)
    except BitblendError as exc:
        raise RequestError(f"row {i + 1}: {exc}") from None
    return name


def _image_file(
    value: Any, row: int, column: str, tmp: Path, root: Path | None, kind: str = "image"
) -> str:
    """A file path load_images (or load_audio: `kind` audio) can open: a decoded data URI
    in `tmp`, or a path in `root`."""
    where = f"row {row}: {column}"
    want = f"expected a base64 data URI (data:{kind}/...;base64,...)"
    if not isinstance(value, str) or not value:
        raise RequestError(f"{where}: {want}")
    if value.startswith("data:"):
        head, _, payload = value.partition(",")
        if not head.endswith(";base64"):
            raise RequestError(f"{where}: {want}")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{where}: not valid base64") from None
        path = tmp / (f"row-{row}" if kind == "image" else f"row-{row}-{kind}")
        path.write_bytes(raw)
        return str(path)
    if root is None:
        raise RequestError(
            f"{where}: {kind} file paths are not accepted (start the server with --image-root "
            "DIR); send a base64 data URI"
        )
    path = (root / value).resolve()
    if not path.is_relative_to(root.resolve()):
        raise RequestError(f"{where}: {value!r} is outside --image-root")
    return str(path)


def needs_thread(body: bytes, run: Predictor) -> bool:
    """Whether parsing `body` is worth a thread hop: image / audio decoding, or a large body. A
    small text/feature row parses in ~0.1 ms, less than handing it to a thread costs."""
    return len(body) > INLINE_PARSE_BYTES or any(
        t.image_column or t.audio_column for t in run.tasks
    )


def parse_request(body: bytes, run: Predictor, image_root: Path | None = None) -> ParsedRequest:
    """Split a body into per-task tables, checked row by row as `predict` checks a file."""
    single, rows = _rows(body)
    by_task: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_task.setdefault(_task_of(run, row, i), []).append(i)
    with contextlib.ExitStack() as stack:
        # Decoded images need a directory; text rows do not: creating and removing one per
        # request cost ~6 ms of rmdir on this machine's /tmp (measured, cProfile).
        tmp: Path | None = None
        groups = []
        for task, positions in by_task.items():
            index, cfg = run.task(task)
            keys = list(dict.fromkeys(k for i in positions for k in rows[i] if k != TASK_KEY))
            cols = {k: [rows[i].get(k) for i in positions] for k in keys}
            image_col = cfg.image_column
            audio_col = cfg.audio_column
            if tmp is None and any(c is not None and c in cols for c in (image_col, audio_col)):
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bitblend-req-")))
            if image_col is not None and image_col in cols:
                assert tmp is not None
                cols[image_col] = [
                    _image_file(v, positions[j] + 1, image_col, tmp, image_root)
                    for j, v in enumerate(cols[image_col])
                ]
            if audio_col is not None and audio_col in cols:  # same rules as images
                assert tmp is not None
                cols[audio_col] = [
                    _image_file(v, positions[j] + 1, audio_col, tmp, image_root, "audio")
                    for j, v in enumerate(cols[audio_col])
                ]
            try:
                table = table_from_columns(cols, cfg, "request", f"the run's tasks[{index}]",
                                           labelled=False)  # fmt: skip
            except BitblendError as exc:
                msg = str(exc) if tmp is None else str(exc).replace(str(tmp), "request")
                raise RequestError(msg) from None
            except (TypeError, ValueError) as exc:
                raise RequestError(f"request: task {task}: {exc}") from None
            groups.append(Group(task, positions, table))
    return ParsedRequest(single, len(rows), groups)
