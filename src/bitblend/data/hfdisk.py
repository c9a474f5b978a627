"""HF `datasets` directories written by `save_to_disk` (a Dataset or a DatasetDict).

A Dataset is all train data. A DatasetDict gives train from its "train" split and eval from
"validation" (or, without one, "test"): validation is what model choices are made on, so it
is preferred when both exist. Labels come back raw: a `ClassLabel` id becomes its class
name, a list of `ClassLabel` ids a list of names (multilabel), other values stay as stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bitblend.data.table import SourceData, Table, is_missing, numeric_matrix
from bitblend.errors import BitblendError

EVAL_SPLITS = ("validation", "test")


def _class_names(feature: Any) -> tuple[list[str] | None, bool]:
    """(class names, is a list column) of a label feature; names None when not a ClassLabel."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), False
    inner = getattr(feature, "feature", None)  # List / Sequence / LargeList of ClassLabel
    if isinstance(inner, datasets.ClassLabel):
        return list(inner.names), True
    return None, False


def _table(
    ds: Any, where: str, text: str, label: str, features: list[str] | None
) -> tuple[Table, list[str] | None]:
    """One split as a Table (text if the column exists, tabular if `features`), class names."""
    cols = list(ds.column_names)

    def need(col: str, key: str) -> list[Any]:
        if col not in cols:
            raise BitblendError(
                f"{where}: column {col!r} not found (columns: {', '.join(cols)}); set {key}"
            )
        return list(ds[col])

    labels = need(label, "label_column")
    for i, y in enumerate(labels):
        if is_missing(y):
            raise BitblendError(f"{where}: row {i + 1}: column {label!r} is empty")
    names, is_list = _class_names(ds.features[label])
    if names is not None:
        labels = [[names[k] for k in y] for y in labels] if is_list else [names[y] for y in labels]
    tab = None
    if features:
        tab = numeric_matrix([(c, need(c, "feature_columns")) for c in features], where)
    txt = None
    if text in cols:
        txt = list(ds[text])
        for i, t in enumerate(txt):
            if not (isinstance(t, str) and t.strip()) and not (isinstance(t, list) and t):
                raise BitblendError(f"{where}: row {i + 1}: column {text!r} is empty or not text")
    elif not features:  # neither text nor features: the task would have no input at all
        need(text, "text_column (or feature_columns)")
    table = Table(labels=labels, text=txt, tabular=tab, rows=np.arange(len(labels)))
    return table, names


def load_hf_disk(
    path: Path, text_column: str, label_column: str, feature_columns: list[str] | None
) -> SourceData:
    """train (and eval from a validation/test split) of a save_to_disk directory."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError) as exc:  # FileNotFoundError is an OSError
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BitblendError(f"{path}: cannot load as a datasets directory ({first})") from None
    feats = list(feature_columns or [])
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise BitblendError(
                f"{path}: DatasetDict without a 'train' split (splits: {', '.join(loaded)})"
            )
        train, names = _table(loaded["train"], f"{path} [train]", text_column, label_column, feats)
        ev_name = next((k for k in EVAL_SPLITS if k in loaded), None)
        ev = None
        if ev_name is not None:
            where = f"{path} [{ev_name}]"
            ev, _ = _table(loaded[ev_name], where, text_column, label_column, feats)
        return SourceData(train, eval=ev, feature_names=feats, label_names=names)
    if not isinstance(loaded, datasets.Dataset):
        raise BitblendError(
            f"{path}: expected a Dataset or DatasetDict, got {type(loaded).__name__}"
        )
    train, names = _table(loaded, str(path), text_column, label_column, feats)
    return SourceData(train, feature_names=feats, label_names=names)
