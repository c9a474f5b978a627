"""Sharded, out-of-core sources: rows (dicts of columns) read lazily, never loaded whole.

A streamed task's `data` is a directory or glob of shards - JSONL (optionally .gz / .zst),
Parquet, plain text (one row per non-blank line, as HF's `text` builder does), or the
Arrow files of an HF `save_to_disk` directory - read with the standard library, pyarrow
and zstandard one record batch or line at a time.

Order. Epoch e visits the shards in a permutation seeded by (seed, e); inside a shard, rows
are shuffled in windows of `shuffle_buffer` raw rows by a permutation seeded by (seed, e,
shard, window). Unlike a classic streaming shuffle buffer (whose contents would have to go
into the checkpoint), every window is a pure function of the seed, so a stream's position
is just a `Cursor` (epoch, shard position, window, offset) and resuming re-reads at most one
window. `shuffle_buffer: 0` keeps the files' order.

Global index. The good rows of the whole stream, in that order, are numbered g = 0, 1, ...
(rows skipped by `data_errors: skip` get no number). Consumer c of C (rank x loader worker,
see `data/stream_loader.py`) keeps a disjoint residue class of g, so every consumer reads
and parses every row but decodes/tokenises only its own: no duplicates, no gaps, and the
global order does not depend on how many consumers there are.

Held out. Without `eval_data`, the first `stream_eval_rows` good rows of the first shard
(in sorted file order) are the eval split and never enter the training stream.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bitblend.errors import BitblendError, cut

# Suffixes a shard may have (the longest that matches decides its kind).
SHARD_KINDS = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".jsonl.zst": "jsonl",
    ".json": "jsonl",
    ".txt": "text",
    ".txt.gz": "text",
    ".txt.zst": "text",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
PARQUET_BATCH = 1024  # rows decoded at a time: bounds memory, whatever the row group size
ErrorMode = Literal["raise", "skip"]


def shard_kind(path: Path) -> str | None:
    """`jsonl`, `text`, `parquet` or `arrow` for a shard file; None for other files."""
    name = path.name.lower()
    best = max((s for s in SHARD_KINDS if name.endswith(s)), key=len, default=None)
    return SHARD_KINDS[best] if best else None


def is_glob(data: str) -> bool:
    """Whether `data` is a glob pattern rather than one path."""
    return any(c in data for c in "*?[")


def find_shards(data: str, where: str) -> list[Path]:
    """The shard files of `data` (directory, glob or one file), sorted by path."""
    if is_glob(data):
        found = [Path(p) for p in glob.glob(data, recursive=True)]
    else:
        path = Path(data)
        if path.is_dir():
            if is_hf_dir(path):
                return hf_arrow_files(path)
            found = [p for p in path.rglob("*") if not p.name.startswith(".")]
        elif path.is_file():
            found = [path]
        else:
            raise BitblendError(f"{where}: {data}: no such file or directory")
    shards = sorted(p for p in found if p.is_file() and shard_kind(p) is not None)
    if not shards:
        raise BitblendError(
            f"{where}: {data}: no shards found; expected .jsonl(.gz/.zst), .parquet, "
            ".txt(.gz/.zst) files or an HF save_to_disk directory"
        )
    return shards


def is_hf_dir(path: Path) -> bool:
    """Whether `path` is an HF save_to_disk directory (a Dataset or a DatasetDict)."""
    return any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def hf_arrow_files(path: Path) -> list[Path]:
    """The Arrow files of an HF save_to_disk directory (a DatasetDict: its train split)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise BitblendError(
                f"{path}: DatasetDict without a 'train' split (splits: {', '.join(splits)})"
            )
        path = path / "train"
    state = path / "state.json"
    files = []
    if state.is_file():
        files = [path / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    if not files:
        raise BitblendError(f"{path}: a save_to_disk directory without Arrow files")
    return files


def total_bytes(shards: list[Path]) -> int:
    """Bytes on disk of all shards."""
    return sum(p.stat().st_size for p in shards)


def _open_text(path: Path) -> io.TextIOBase:
    """A text stream of a (possibly .gz / .zst compressed) file, decompressed lazily."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
    if name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)  # noqa: SIM115
        return io.TextIOWrapper(raw, encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


@dataclass
class RawRow:
    """One raw row of a shard: its columns, or the reason it is unusable."""

    where: str  # "line 7" / "row 7" (1-based), for messages
    row: dict[str, Any] | None
    problem: str | None = None


class ShardFile:
    """One shard: raw rows from a given raw index, each checked for the text column."""

    def __init__(self, path: Path, column: str) -> None:
        self.path = path
        self.kind = shard_kind(path) or "jsonl"
        self.column = column

    def _fail(self, what: str) -> BitblendError:
        return BitblendError(f"{self.path}: {what}")

    def rows(self, start: int = 0) -> Iterator[RawRow]:
        """Raw rows from raw index `start` on (a raw row is a non-blank line or a record)."""
        if self.kind in ("jsonl", "text"):
            yield from self._lines(start)
        else:
            yield from self._records(start)

    def _lines(self, start: int) -> Iterator[RawRow]:
        k = 0
        try:
            with _open_text(self.path) as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    k += 1
                    if k <= start:
                        continue  # JSON is parsed only for rows read, not for rows skipped
                    yield self._line(n, line)
        except UnicodeDecodeError as exc:
            raise self._fail(f"not UTF-8 text near line {k + 1} ({exc.reason})") from None
        except (OSError, EOFError) as exc:  # gzip / zstd: truncated or not compressed
            raise self._fail(f"cannot read ({cut(str(exc))})") from None
        if k == 0:
            want = "one JSON object per line" if self.kind == "jsonl" else "lines of text"
            raise self._fail(f"the shard is empty; expected {want}")

    def _line(self, n: int, line: str) -> RawRow:
        where = f"line {n}"
        if self.kind == "text":
            return RawRow(where, {self.column: line.rstrip("\r\n")})
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return RawRow(where, None, f"invalid JSON ({exc.msg}, column {exc.colno})")
        if not isinstance(row, dict):
            return RawRow(where, None, f"expected a JSON object, got {type(row).__name__}")
        return self._check(where, row, list(row))

    def _check(self, where: str, row: dict[str, Any], names: list[str]) -> RawRow:
        if self.column not in row:
            return RawRow(where, None, f"no column {self.column!r} (columns: {', '.join(names)})")
        text = row[self.column]
        if not (isinstance(text, str) and text.strip()):
            return RawRow(where, None, f"column {self.column!r} is empty or not text")
        return RawRow(where, row)

    def _batches(self, start: int) -> Iterator[tuple[int, Any]]:
        """(raw index of the batch's first row, pyarrow RecordBatch) from `start` on."""
        import pyarrow as pa

        if self.kind == "arrow":
            try:
                reader = pa.ipc.open_stream(pa.memory_map(str(self.path)))
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(pa.memory_map(str(self.path)))
                batches: Any = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = reader
            at = 0
            for b in batches:
                if at + b.num_rows > start:
                    yield at, b
                at += b.num_rows
            return
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.path)
        meta = pf.metadata
        at, groups = 0, []
        for g in range(meta.num_row_groups):  # whole row groups before `start` are not read
            n = meta.row_group(g).num_rows
            if at + n > start:
                groups.append(g)
            elif not groups:
                at += n
        if groups:
            for b in pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=groups):
                yield at, b
                at += b.num_rows

    def _records(self, start: int) -> Iterator[RawRow]:
        import pyarrow as pa

        kind = "Parquet" if self.kind == "parquet" else "Arrow"
        seen = 0
        try:
            for at, batch in self._batches(start):
                names = list(batch.schema.names)
                if self.column not in names:
                    why = f"no column {self.column!r} (columns: {', '.join(names)})"
                    for i in range(max(at, start), at + batch.num_rows):
                        yield RawRow(f"row {i + 1}", None, why)
                    seen += batch.num_rows
                    continue
                rows = batch.to_pylist()
                for i, row in enumerate(rows):
                    if at + i >= start:
                        yield self._check(f"row {at + i + 1}", row, names)
                seen += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise self._fail(f"not a readable {kind} file ({cut(first)})") from None
        if seen == 0 and start == 0:
            raise self._fail(f"the shard is empty; expected {kind} rows")

    def estimate_rows(self, sample: int = 64) -> int:
        """Rows in the shard: exact for Parquet / Arrow, estimated for text from a sample."""
        import pyarrow as pa

        if self.kind == "parquet":
            import pyarrow.parquet as pq

            try:
                return int(pq.ParquetFile(self.path).metadata.num_rows)
            except (pa.ArrowException, OSError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise self._fail(f"not a readable Parquet file ({cut(first)})") from None
        if self.kind == "arrow":
            return sum(b.num_rows for _, b in self._batches(0))
        used = n = 0
        with _open_text(self.path) as fh:
            for line in fh:
                used += len(line.encode("utf-8"))
                n += bool(line.strip())
                if n >= sample:
                    break
        if n < sample:  # the whole shard was read
            return n
        return max(1, round(_plain_size(self.path) / (used / n)))


def _plain_size(path: Path) -> int:
    """Uncompressed bytes of a shard (gzip: its ISIZE trailer; zstd: the frame header)."""
    size = path.stat().st_size
    name = path.name.lower()
    if name.endswith(".gz"):
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            isize = int.from_bytes(fh.read(4), "little")  # size mod 2**32
        return isize + (size * 4 // 2**32) * 2**32
    if name.endswith(".zst"):
        import zstandard

        with open(path, "rb") as fh:
            known = zstandard.frame_content_size(fh.read(18))
        return known if known > 0 else size * 4  # unknown: assume a typical 4x ratio
    return size


@dataclass(frozen=True)
class Cursor:
    """A good row's place in the stream: epoch, position in the epoch's shard order, shuffle
    window, offset in the shuffled window, and its global index g."""

    epoch: int
    shard: int
    window: int
    offset: int
    g: int

    def as_list(self) -> list[int]:
        """JSON-able form for the checkpoint."""
        return [self.epoch, self.shard, self.window, self.offset, self.g]


@dataclass
class StreamRow:
    """A good row as the stream hands it out."""

    g: int
    cursor: Cursor
    row: dict[str, Any]
    skipped: int  # rows skipped for data_errors: skip so far (whole stream, up to here)
    note: str | None = None  # the last skip's message, when this row follows skips


@dataclass
class StreamSource:
    """A sharded corpus and how to walk it: order, hold-out, error policy."""

    shards: list[Path]
    column: str
    seed: int
    shuffle_buffer: int = 1024
    errors: ErrorMode = "raise"
    holdout: int = 0  # raw rows at the start of shards[0] kept out of the stream (eval)
    estimate: int = 0  # estimated good rows per epoch (sizes for mixing and epochs)
    label: str = ""  # the recipe's `data`, for messages

    def order(self, epoch: int) -> list[int]:
        """Shard indices in the order epoch `epoch` visits them."""
        if self.shuffle_buffer <= 0:
            return list(range(len(self.shards)))
        rng = np.random.default_rng([self.seed, 0x5EED, epoch])
        return [int(i) for i in rng.permutation(len(self.shards))]

    def window_size(self) -> int:
        """Raw rows per shuffle window."""
        return self.shuffle_buffer if self.shuffle_buffer > 0 else 4096

    def _window(self, epoch: int, shard: int, window: int, raw: list[RawRow]) -> list[RawRow]:
        if self.shuffle_buffer <= 0 or len(raw) < 2:
            return raw
        rng = np.random.default_rng([self.seed, 0x5EED, epoch, shard, window])
        return [raw[i] for i in rng.permutation(len(raw))]

    def rows(self, after: Cursor | None = None, skipped: int = 0) -> Iterator[StreamRow]:
        """Good rows after `after` (from the start when None), forever (epoch after epoch).

        `skipped` is the skip count at `after`. Bad rows raise a one-line BitblendError, or
        with `errors: skip` are passed over and counted.
        """
        epoch, pos, window, offset = (0, 0, 0, -1) if after is None else (
            after.epoch, after.shard, after.window, after.offset)  # fmt: skip
        g = -1 if after is None else after.g
        size = self.window_size()
        note: str | None = None
        while True:
            good_in_epoch = 0
            order = self.order(epoch)
            while pos < len(order):
                sid = order[pos]
                shard = ShardFile(self.shards[sid], self.column)
                base = self.holdout if sid == 0 else 0
                try:
                    it = shard.rows(base + window * size)
                    while True:
                        raw = [r for _, r in zip(range(size), it, strict=False)]
                        if not raw:
                            break
                        for k, r in enumerate(self._window(epoch, sid, window, raw)):
                            if k <= offset:
                                continue
                            if r.row is None:
                                msg = f"{shard.path}: {r.where}: {r.problem}"
                                if self.errors != "skip":
                                    raise BitblendError(msg)
                                skipped, note = skipped + 1, msg
                                continue
                            g += 1
                            good_in_epoch += 1
                            yield StreamRow(g, Cursor(epoch, pos, window, k, g), r.row,
                                            skipped, note)  # fmt: skip
                            note = None
                        window, offset = window + 1, -1
                except BitblendError as exc:  # a bad row raised above, or a bad shard
                    if self.errors != "skip":
                        raise
                    skipped, note = skipped + 1, str(exc)  # skip: the rest of the shard
                pos, window, offset = pos + 1, 0, -1
            if good_in_epoch == 0 and after is None:
                held = f" after the {self.holdout} held out for eval" if self.holdout else ""
                raise BitblendError(
                    f"{self.label}: no rows left to train on in {len(order)} shard(s){held}; "
                    "add data or lower stream_eval_rows"
                )
            epoch, pos, after = epoch + 1, 0, None

    def epochs_at(self, cursor: Cursor | None) -> float:
        """Epochs completed at `cursor`: whole epochs exactly, plus the shards done and the
        current shard's rows read (against its estimated share of rows) over the shards."""
        if cursor is None:
            return 0.0
        n = max(1, len(self.shards))
        in_shard = (cursor.window * self.window_size() + cursor.offset + 1) / max(
            1.0, self.estimate / n
        )
        return cursor.epoch + min(cursor.shard + min(in_shard, 1.0), n - 1e-9) / n


def preflight(shards: list[Path], column: str, errors: ErrorMode) -> list[str]:
    """Open every shard and read its first row, so a missing text column, an unreadable
    file or an empty shard fails before the run starts; returns skip notes (errors: skip)."""
    notes = []
    for p in shards:
        try:
            first = next(ShardFile(p, column).rows(), None)
        except BitblendError as exc:
            if errors != "skip":
                raise
            notes.append(str(exc))
            continue
        if first is not None and first.row is None:
            msg = f"{p}: {first.where}: {first.problem}"
            if errors != "skip":
                raise BitblendError(msg)
            notes.append(msg)
    return notes


def read_all(
    shards: list[Path], column: str, errors: ErrorMode = "raise"
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every good row of `shards` in file order, in memory (small sharded sources), and the
    message of each row or shard skipped."""
    out: list[dict[str, Any]] = []
    skipped: list[str] = []
    for p in shards:
        try:
            for r in ShardFile(p, column).rows():
                if r.row is not None:
                    out.append(r.row)
                    continue
                msg = f"{p}: {r.where}: {r.problem}"
                if errors != "skip":
                    raise BitblendError(msg)
                skipped.append(msg)
        except BitblendError as exc:  # a bad row raised above, or an unreadable/empty shard
            if errors != "skip":
                raise
            skipped.append(str(exc))
    return out, skipped


@dataclass
class HeldOut:
    """The rows held out of a stream for eval, the raw rows they span, and a train sample."""

    eval_rows: list[dict[str, Any]] = field(default_factory=list)
    raw: int = 0
    sample: list[dict[str, Any]] = field(default_factory=list)


def hold_out(shard: Path, column: str, n_eval: int, n_sample: int, errors: ErrorMode) -> HeldOut:
    """The first `n_eval` good rows of `shard` (eval) and the next `n_sample` (a sample of
    the training stream, for tokenizer training and cost estimates)."""
    out = HeldOut()
    try:
        for r in ShardFile(shard, column).rows():
            if r.row is None and errors != "skip":
                raise BitblendError(f"{shard}: {r.where}: {r.problem}")
            if len(out.eval_rows) < n_eval:
                out.raw += 1  # a held-out raw row: the stream starts after it
                if r.row is not None:
                    out.eval_rows.append(r.row)
            elif r.row is not None:
                out.sample.append(r.row)
            if len(out.sample) >= n_sample:
                break
    except BitblendError:  # an empty or unreadable first shard: the stream skips it too
        if errors != "skip":
            raise
    return out
