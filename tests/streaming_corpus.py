"""A synthetic many-shard corpus for the streaming tests and benchmark: every shard format
the reader supports, rows numbered so any duplicate or gap shows."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def doc(i: int) -> str:
    """Row i's text: its number first, then a few words (lengths vary)."""
    return f"doc{i} " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 9))


def write_corpus(root: Path, rows_per_shard: int = 37) -> list[str]:
    """Seven shards (jsonl, jsonl.gz, jsonl.zst, parquet in several row groups, txt) under
    `root`; returns the texts in sorted-path order (the order a 0-buffer stream reads)."""
    root.mkdir(parents=True, exist_ok=True)
    kinds = ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "e.txt", "f.jsonl", "g.parquet"]
    texts: list[str] = []
    i = 0
    for name in kinds:
        rows = [doc(i + k) for k in range(rows_per_shard)]
        i += rows_per_shard
        path = root / f"shard-{name}"
        lines = "".join(json.dumps({"text": t, "id": n}) + "\n" for n, t in enumerate(rows))
        if name.endswith(".jsonl"):
            path.write_text(lines)
        elif name.endswith(".gz"):
            path.write_bytes(gzip.compress(lines.encode()))
        elif name.endswith(".zst"):
            path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
        elif name.endswith(".parquet"):
            table = pa.table({"id": list(range(len(rows))), "text": rows})
            pq.write_table(table, path, row_group_size=10)
        else:
            path.write_text("\n".join(rows) + "\n\n")  # a trailing blank line is no row
        texts.extend(rows)
    return texts
