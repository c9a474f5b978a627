"""What several commands share: quiet library logging, JSON for users, finite outputs,
the column options of eval / predict."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from bitblend.errors import BitblendError


def quiet_libraries() -> None:
    # transformers/datasets print load reports and download bars meant for hub use; a
    # bitblend run reports what matters itself. Offline: nothing is fetched from a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # torchao / bitsandbytes log at import about GPU kernels a CPU build lacks.
    for name in ("torchao", "bitsandbytes", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def user_json(data: object, indent: int | None = 2) -> str:
    """JSON for users to read: UTF-8 text (Chinese labels as characters, not \\u escapes),
    escaped only where stdout cannot encode it."""
    encoding = (getattr(sys.stdout, "encoding", None) or "utf-8").lower().replace("-", "")
    return json.dumps(data, indent=indent, ensure_ascii=not encoding.startswith("utf"))


def check_finite(rows: list[dict[str, object]], source: Path) -> None:
    """Predictions never carry NaN/inf into JSON (which standard JSON cannot even hold)."""
    import math

    def bad(v: object) -> bool:
        if isinstance(v, float):
            return not math.isfinite(v)
        if isinstance(v, dict):
            return any(bad(x) for x in v.values())
        return isinstance(v, list) and any(bad(x) for x in v)

    for i, row in enumerate(rows, 1):
        if bad(row):
            raise BitblendError(
                f"--input {source}: row {i}: the model's output is not finite (NaN or inf); the "
                "run's weights or this row's inputs hold inf/NaN, nothing was written"
            )


def column_overrides(args: argparse.Namespace) -> dict[str, object]:
    """--text-column and friends as task keys (None: the run's own column names)."""
    feats = getattr(args, "feature_columns", None)
    return {
        "text_column": getattr(args, "text_column", None),
        "label_column": getattr(args, "label_column", None),
        "image_column": getattr(args, "image_column", None),
        "audio_column": getattr(args, "audio_column", None),
        "feature_columns": [c.strip() for c in feats.split(",") if c.strip()] if feats else None,
    }
