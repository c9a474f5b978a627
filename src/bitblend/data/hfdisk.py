"""HF `datasets` directories written by `save_to_disk` (a Dataset or a DatasetDict)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bitblend.data.table import SourceData, Table
from bitblend.errors import BitblendError


def _table(ds: object, path: Path, text: str, label: str, features: list[str] | None) -> Table:
    cols = ds.column_names  # type: ignore[attr-defined]
    for col in [label, *(features or [])]:
        if col not in cols:
            raise BitblendError(f"{path}: column {col!r} not found (columns: {', '.join(cols)})")
    tab = None
    if features:
        tab = np.stack([np.asarray(ds[c], dtype=np.float32) for c in features], axis=1)  # type: ignore[index]
    txt = list(ds[text]) if text in cols else None  # type: ignore[index]
    return Table(labels=list(ds[label]), text=txt, tabular=tab)  # type: ignore[index]


def load_hf_disk(
    path: Path, text_column: str, label_column: str, feature_columns: list[str] | None
) -> SourceData:
    """train (and eval from a test/validation split) of a save_to_disk directory."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise BitblendError(f"{path}: cannot load as a datasets directory ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise BitblendError(f"{path}: DatasetDict without a 'train' split ({list(loaded)})")
        ev = next((loaded[k] for k in ("validation", "test") if k in loaded), None)
        return SourceData(
            _table(loaded["train"], path, text_column, label_column, feature_columns),
            eval=None
            if ev is None
            else _table(ev, path, text_column, label_column, feature_columns),
            feature_names=list(feature_columns or []),
        )
    return SourceData(
        _table(loaded, path, text_column, label_column, feature_columns),
        feature_names=list(feature_columns or []),
    )
