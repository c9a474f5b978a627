"""The raw-data contract between sources and encoders: a column table of one split.

Every source (built-in corpora, user files, image folders, the synthetic fraud generator)
produces `Table`s; `data/modalities.py` turns them into model inputs. A table holds any
combination of modalities, so one example can carry text, an image and tabular features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitblend.errors import BitblendError, quote

MODALITIES = ("text", "image", "tabular", "audio")
_F32_MAX = float(np.finfo(np.float32).max)


@dataclass
class Table:
    """Columns of one split; `labels[i]` belongs to example i.

    text:    list of strings, or of word lists for token classification
    image:   (n, H, W, C) float32 in [0, 1] (every image of a source has one size)
    tabular: (n, F) float32; NaN marks a missing feature
    audio:   list of (samples,) float32 mono clips at `audio_rate` Hz, any length (an empty
             clip marks a missing recording); encoding resamples, cuts and pads them
    labels:  class name/id, number, list of class names (multilabel), list of tags
             (token classification), or None for language-model tasks
    """

    labels: list[Any]
    text: list[Any] | None = None
    image: np.ndarray | None = None
    tabular: np.ndarray | None = None
    audio: list[np.ndarray] | None = None
    audio_rate: int = 16000  # sample rate of every clip in `audio`
    rows: np.ndarray | None = None  # (n,) 0-based row of each example in its file, for errors

    def __post_init__(self) -> None:
        n = len(self.labels)
        for name in MODALITIES:
            col = getattr(self, name)
            if col is not None and len(col) != n:
                raise ValueError(f"column {name} has {len(col)} rows, labels have {n}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def modalities(self) -> list[str]:
        """Names of the modality columns present."""
        return [m for m in MODALITIES if getattr(self, m) is not None]

    def take(self, idx: Sequence[int] | np.ndarray) -> Table:
        """The rows `idx`, in that order."""
        ix = np.asarray(idx, dtype=np.int64)
        return Table(
            labels=[self.labels[i] for i in ix],
            text=None if self.text is None else [self.text[i] for i in ix],
            image=None if self.image is None else self.image[ix],
            tabular=None if self.tabular is None else self.tabular[ix],
            audio=None if self.audio is None else [self.audio[i] for i in ix],
            audio_rate=self.audio_rate,
            rows=None if self.rows is None else self.rows[ix],
        )

    def row(self, i: int) -> int:
        """1-based file row of example i (its position when the source has no rows)."""
        return int(self.rows[i]) + 1 if self.rows is not None else i + 1


@dataclass
class SourceData:
    """What a source provides: the data, and an eval split if the source defines one."""

    train: Table
    eval: Table | None = None
    feature_names: list[str] = field(default_factory=list)  # tabular column names
    label_names: list[str] | None = None  # canonical class order, if the source has one
    synthetic: bool = False  # generated data: marked as such in docs and outputs
    description: str = ""


def is_missing(value: Any) -> bool:
    """A blank cell: None, an empty string or NaN."""
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def numeric_matrix(columns: list[tuple[str, list[Any]]], where: str) -> np.ndarray:
    """(n, F) float32 from named numeric columns; None becomes NaN (a missing feature).

    A value that is not a number is a one-line error naming `where`, the row and the column.
    """
    rows = []
    for name, col in columns:
        try:
            values = [math.nan if v is None else float(v) for v in col]
        except (TypeError, ValueError):
            bad = next(i for i, v in enumerate(col) if v is not None and not _number(v))
            raise BitblendError(
                f"{where}: row {bad + 1}: feature {name!r} value {quote(col[bad])} is not a number"
            ) from None
        # NaN marks a missing feature; an infinity is no value the model can standardise
        # (it turns the column's mean and std into inf/NaN and every step non-finite).
        inf = next((i for i, v in enumerate(values) if math.isinf(v)), None)
        if inf is not None:
            raise BitblendError(
                f"{where}: row {inf + 1}: feature {name!r} value {quote(col[inf])} is not finite; "
                "leave the cell blank to mark it missing"
            )
        # float32 overflows past 3.4e38: such a value would become inf in the matrix.
        big = next((i for i, v in enumerate(values) if abs(v) > _F32_MAX), None)
        if big is not None:
            raise BitblendError(
                f"{where}: row {big + 1}: feature {name!r} value {quote(col[big])} is beyond "
                "float32's range (3.4e38)"
            )
        rows.append(values)
    return np.asarray(rows, dtype=np.float32).T


def _number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True
