"""Resident memory of a streamed corpus stays flat: RSS after 1M tokens vs after 20M.

    python benchmarks/stream_memory.py                 # 20M tokens, one background thread
    python benchmarks/stream_memory.py --workers 1     # DataLoader worker (RSS of both)

Writes a generated corpus of .jsonl.zst shards (about 1.5 MB of JSONL per million tokens of
the tiny-gpt byte-level tokenizer) to a temporary directory, streams it through the real
`StreamSampler` (read, shuffle windows, tokenise, batch) and prints the resident set size of
the process (plus its loader workers) when 1M and when `--tokens` tokens have been
streamed. Target (issue 17): growth < 10%.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

from bitblend.data.stream_loader import StreamedSplit, StreamSampler  # noqa: E402
from bitblend.data.streaming import StreamSource, find_shards  # noqa: E402
from bitblend.models.backbones import load_backbone_with_head  # noqa: E402


def rss_bytes(pids: list[int]) -> int:
    """Resident set size of these processes together (Linux /proc)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):  # a worker that just exited
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
    return total


def children(pid: int) -> list[int]:
    """Direct child processes (the DataLoader's workers)."""
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def write_corpus(root: Path, megabytes: float, shards: int, seed: int = 0) -> None:
    """Documents of pseudo-words (Zipf-distributed) as zstd-compressed JSONL shards."""
    import zstandard

    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(20_000)]
    per_shard = int(megabytes * 2**20 / shards)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        out, size = [], 0
        while size < per_shard:
            words = rng.zipf(1.3, size=int(rng.integers(50, 400))) % len(vocab)
            line = json.dumps({"text": " ".join(vocab[w] for w in words), "id": len(out)})
            out.append(line)
            size += len(line) + 1
        data = ("\n".join(out) + "\n").encode()
        (root / f"shard-{s:04d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))


def main() -> int:
    """Stream, measure, print one line per checkpoint and the verdict."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=float, default=20e6, help="tokens to stream in total")
    ap.add_argument("--workers", type=int, default=0, help="train.stream_workers")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dir", help="reuse/keep the corpus here instead of a temporary one")
    args = ap.parse_args()
    tok = load_backbone_with_head("tiny-gpt", None, 0.0, 0.0, "auto")[1]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir or tmp) / "corpus"
        if not root.exists():
            t0 = time.perf_counter()
            # about one epoch: ~1.4 bytes of JSONL per tiny-gpt token on these pseudo-words
            write_corpus(root, args.tokens * 1.5 / 2**20, shards=64)
            print(f"corpus written in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        shards = find_shards(str(root), "corpus")
        mb = sum(p.stat().st_size for p in shards) / 2**20
        src = StreamSource(shards, "text", seed=0, shuffle_buffer=1024, label=str(root))
        split = StreamedSplit("causal_lm", np.zeros(0), np.zeros(0, np.int64), estimate=1)
        sampler = StreamSampler(split, src, tok, 1024, args.batch, args.workers, seed=0)
        me = os.getpid()
        tokens, marks, t0 = 0, {}, time.perf_counter()
        targets = [1e6, args.tokens / 4, args.tokens / 2, args.tokens]
        while tokens < args.tokens:
            idx = sampler.next()
            tokens += int(split.lengths[idx].sum())
            for t in targets:
                if t not in marks and tokens >= t:
                    marks[t] = rss_bytes([me, *children(me)])
                    print(f"{tokens / 1e6:6.1f}M tokens  RSS {marks[t] / 2**20:7.1f} MiB  "
                          f"{time.perf_counter() - t0:6.1f}s", file=sys.stderr)  # fmt: skip
        sampler.close()
        growth = marks[args.tokens] / marks[1e6] - 1
        rate = tokens / (time.perf_counter() - t0)
        print(
            f"{len(shards)} shards, {mb:.0f} MB compressed; epochs {sampler.epochs_completed:.2f}; "
            f"{rate / 1e6:.2f}M tokens/s; RSS growth 1M -> {args.tokens / 1e6:.0f}M tokens: "
            f"{growth:+.1%} (target < 10%)"
        )
        return 0 if growth < 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
