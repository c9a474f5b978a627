"""Sequence packing for language-model tasks: documents -> full `max_length` rows.

A padded causal-LM batch of short documents spends most of its positions on padding.
Packing concatenates tokenised documents (each ending with an EOS separator) into rows of
exactly `max_length` tokens (only the stream's last row is partial). Each token also gets
its document's index within the row (`segments`, 1-based; 0 = padding), from which collate
derives per-document position ids (0, 1, ... restarting at each document) and the model a
block-diagonal attention mask (models/packed.py), so no token attends across a document
boundary and packed logits equal those of each document run alone.

A document longer than the rest of a row continues in the next row as a new segment
(positions restart there too), so no token is dropped. The packer consumes any iterator of
token-id lists: an in-memory split or a streaming reader, it does not care which.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from bitblend.config.schema import IGNORE, TaskConfig

PACKABLE_HEADS = ("causal_lm", "masked_lm")


def packing_enabled(task: TaskConfig) -> bool:
    """`tasks[i].packing`, with null = on for causal_lm and off for every other head."""
    if task.packing is None:
        return task.head == "causal_lm"
    return bool(task.packing) and task.head in PACKABLE_HEADS


class Packer:
    """Greedy packer: `feed` documents, take full rows as they fill, `flush` the rest.

    Stateful (the partial row carries over between documents), so a streaming reader can
    checkpoint it with `state_dict` and resume mid-row.
    """

    def __init__(self, max_length: int, eos_id: int | None) -> None:
        if max_length < 2:
            raise ValueError("packing needs max_length >= 2")
        self.max_length = max_length
        self.eos_id = eos_id
        self._ids: list[int] = []
        self._segs: list[int] = []

    def _document(self, doc: list[int]) -> list[int]:
        # Every document ends with the separator (a tokenizer that already appends it,
        # e.g. BERT's [SEP] or a Llama tokenizer with add_eos, is not given a second one).
        if self.eos_id is not None and (not doc or doc[-1] != self.eos_id):
            return [*doc, self.eos_id]
        return list(doc)

    def feed(self, doc: list[int]) -> Iterator[tuple[list[int], list[int]]]:
        """Add one document; yield every (ids, segments) row it completes."""
        tokens = self._document(doc)
        while tokens:
            room = self.max_length - len(self._ids)
            part, tokens = tokens[:room], tokens[room:]
            seg = (self._segs[-1] + 1) if self._segs else 1
            self._ids.extend(part)
            self._segs.extend([seg] * len(part))
            if len(self._ids) == self.max_length:
                yield self._ids, self._segs
                self._ids, self._segs = [], []

    def flush(self) -> Iterator[tuple[list[int], list[int]]]:
        """The partial last row, if any (collate pads it; no loss on the padding)."""
        if self._ids:
            yield self._ids, self._segs
            self._ids, self._segs = [], []

    def state_dict(self) -> dict[str, Any]:
        """The partial row (a resumed stream continues filling it)."""
        return {"ids": list(self._ids), "segments": list(self._segs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the partial row saved by `state_dict`."""
        self._ids, self._segs = list(state["ids"]), list(state["segments"])


def pack(
    docs: Iterable[list[int]], max_length: int, eos_id: int | None
) -> Iterator[tuple[list[int], list[int]]]:
    """Rows (ids, segments) of `docs` packed to `max_length` (the last one may be short)."""
    packer = Packer(max_length, eos_id)
    for doc in docs:
        yield from packer.feed(doc)
    yield from packer.flush()


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """Per-document position ids: (batch, seq) segment ids -> (batch, seq) int64 positions
    counting from 0 at each document's first token (padding, segment 0, gets 0 too)."""
    seq = segments.shape[1]
    idx = torch.arange(seq, device=segments.device).expand_as(segments)
    # A document starts where the segment id changes (and at column 0).
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return torch.where(segments > 0, idx - first, torch.zeros_like(idx))


def packed_labels(input_ids: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """causal_lm labels of packed rows: the ids, IGNORE on padding and on each document's
    first token (after the loss's shift that is the prediction made from the previous
    document's EOS, which attention cannot see; a document run alone has none either)."""
    first = segment_positions(segments) == 0
    return input_ids.masked_fill(first | (segments == 0), IGNORE)
