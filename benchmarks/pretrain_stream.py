"""`pretrain-mix` streamed: its six domains as sharded corpora, and the data wait it costs.

    python benchmarks/pretrain_stream.py [--steps 30] [--shards 4] [--workers 1]
        [--dir DIR] [--out RUN_DIR] [--set key=value ...]

Writes each domain's training texts (the same seeded split the in-memory recipe trains on)
as zstd-compressed JSONL shards under DIR/<task>/ and its eval texts to DIR/<task>-eval.jsonl,
then trains the built-in `pretrain-mix` recipe with every task streamed (`streaming: true`,
`eval_data` = that file; packing on, as for any causal_lm task) through the real Trainer,
and prints the share of step time the training thread waited for streamed rows:
sum(data_wait) / sum(step_time_s) over the train rows of metrics.jsonl, with and without
each task's first step (which waits for its loader worker to start). Target (issue 17):
< 2%.

Note: a streamed task's in-memory train table is a 256-document sample of its stream, so
the BPE vocabulary is trained on those samples, not on each domain's whole training text.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

from bitblend.config.load import (  # noqa: E402
    apply_overrides,
    read_yaml,
    recipe_from_dict,
    resolve_recipe_path,
)
from bitblend.data.sources import load_task_data  # noqa: E402
from bitblend.train.trainer import Trainer  # noqa: E402


def write_domains(data: dict[str, Any], root: Path, shards: int) -> None:
    """Each task's train texts as `shards` .jsonl.zst files, its eval texts as one .jsonl;
    points the recipe's tasks at them, streamed."""
    import zstandard

    recipe = recipe_from_dict(data)
    for i, task in enumerate(recipe.tasks):
        td = load_task_data(task, i, recipe.train.seed)
        train = [str(t) for t in td.train.text or [] if t is not None and str(t).strip()]
        ev = [str(t) for t in td.eval.text or [] if t is not None and str(t).strip()]
        out = root / task.name
        out.mkdir(parents=True, exist_ok=True)
        for s in range(shards):
            lines = "".join(json.dumps({"text": t}) + "\n" for t in train[s::shards])
            comp = zstandard.ZstdCompressor().compress(lines.encode())
            (out / f"shard-{s:03d}.jsonl.zst").write_bytes(comp)
        eval_file = root / f"{task.name}-eval.jsonl"
        eval_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in ev))
        data["tasks"][i].update(data=str(out), streaming=True, eval_data=str(eval_file))
        print(f"{task.name}: {len(train)} train docs in {shards} shards, {len(ev)} eval")


def main() -> int:
    """Write the shards, train, print the data-wait share."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--shards", type=int, default=4, help="shards per domain")
    ap.add_argument("--workers", type=int, default=1, help="train.stream_workers")
    ap.add_argument("--dir", help="keep the shards here instead of a temporary directory")
    ap.add_argument("--out", help="run directory (default: a temporary one)")
    ap.add_argument("--set", action="append", default=[], help="recipe override key=value")
    args = ap.parse_args()

    data = read_yaml(resolve_recipe_path("pretrain-mix"))
    data = apply_overrides(data, [
        f"train.steps={args.steps}", f"train.eval_every={args.steps}",
        f"train.stream_workers={args.workers}", *args.set,
    ])  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir or Path(tmp) / "shards")
        write_domains(data, root, args.shards)
        run = Path(args.out or Path(tmp) / "run")
        t0 = time.perf_counter()
        Trainer(recipe_from_dict(data), run, show_progress=False).fit()
        wall = time.perf_counter() - t0
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    wait = [float(r["data_wait"]) for r in train]
    step = [float(r["step_time_s"]) for r in train]
    print(f"steps {len(train)}, wall {wall:.1f} s, mean step {sum(step) / len(step):.3f} s")
    print(f"data_wait share, all steps: {100 * sum(wait) / sum(step):.2f}%")
    # Each task's first batch waits for its loader worker to start and tokenise ahead.
    seen: set[str] = set()
    later = []
    for r, w, t in zip(train, wait, step, strict=True):
        if r.get("task") in seen:
            later.append((w, t))
        seen.add(str(r.get("task")))
    if later:
        share = 100 * sum(w for w, _ in later) / sum(t for _, t in later)
        print(f"data_wait share after each task's first step: {share:.2f}% ({len(later)} steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
