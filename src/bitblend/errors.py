"""The one exception type that the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations

import reprlib
from typing import Any

# What a message may quote of a user's value: enough to recognise it, never a multi-KB repr
# (an expanded YAML alias bomb would otherwise put megabytes into one error line).
_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3
QUOTE_LIMIT = 80


class BitblendError(Exception):
    """A user-facing error: bad recipe, bad data, bad path. Printed as one line, exit 2.

    The message names the file, the field or line, and what was expected, e.g.
    ``recipe.yaml: tasks[0].head: expected one of classification, regression, got 'clf'``.
    """


def quote(value: Any) -> str:
    """`repr(value)` cut to about QUOTE_LIMIT characters, for error messages.

    reprlib stops walking nested containers early, so quoting a huge (or self-referencing)
    value costs no more than quoting a small one.
    """
    text = _REPR.repr(value)
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."


def cut(text: str, limit: int = QUOTE_LIMIT) -> str:
    """`text` cut to `limit` characters (an ellipsis marks the cut), for error messages."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
