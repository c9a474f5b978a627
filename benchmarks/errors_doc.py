"""Rewrite docs/errors.md: run every case of tests/error_catalogue.py through the CLI.

    python benchmarks/errors_doc.py            # rewrite docs/errors.md
    python benchmarks/errors_doc.py --check    # exit 1 when the page is stale

A case that breaks the contract (exit code 2, one stderr line, no traceback, nothing on disk
changed) is reported and the page is not written.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tests.error_catalogue import CASES, DOC, PREFIX, prepare_run, render, run_case  # noqa: E402


def main() -> int:
    """Run the cases; write (or --check) the page."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    ap.add_argument("--only", help="run only case ids containing this text (no writing)")
    args = ap.parse_args()
    messages: dict[str, str] = {}
    broken: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        run = prepare_run(Path(tmp) / "shared-run")
        for i, case in enumerate(CASES):
            if args.only and args.only not in case.id:
                continue
            case_dir = Path(tmp) / f"case-{i}"
            case_dir.mkdir()
            t0 = time.perf_counter()
            o = run_case(case, case_dir, run if case.needs_run else None)
            took = time.perf_counter() - t0
            lines = o.err.splitlines()
            ok = (
                o.code == 2
                and len(lines) == 1
                and o.message.startswith(PREFIX)
                and "Traceback" not in o.err
                and o.before == o.after
            )
            if not ok:
                changed = sorted(set(o.before.items()) ^ set(o.after.items()))
                broken.append(f"{case.id}: exit {o.code}, stderr {o.err[-600:]!r}, "
                              f"changed {[k for k, _ in changed][:5]}")  # fmt: skip
            messages[case.id] = o.message
            print(f"{took:5.1f}s {case.id}: {o.message}", file=sys.stderr)
    if broken:
        print("\n".join(["cases that break the contract:", *broken]), file=sys.stderr)
        return 1
    if args.only:
        return 0
    page = render(messages)
    if args.check:
        stale = not DOC.is_file() or DOC.read_text() != page
        print(f"{DOC}: {'stale' if stale else 'up to date'}", file=sys.stderr)
        return int(stale)
    DOC.write_text(page)
    print(f"{len(CASES)} cases -> {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
