"""Sequence lengths a run really computes on, and the step and evaluation time they cost.

`train` pads each batch to its own longest row (data/modalities.py `collate`), rounded up to
`train.pad_to_multiple_of`, so a corpus of short texts runs short steps. Which rows share a
batch is train's BatchSampler (data/sampler.py): a seeded permutation per epoch and, with
`train.group_by_length` (the default), the permutation sorted longest first inside windows
of 50 batches, so a batch holds neighbours in length and pads little; without it a
micro-batch is a uniformly random subset. Packed causal_lm / masked_lm rows are full
`max_length` rows (the stream's last one aside): their measured lengths say so.
Evaluation (train/evaluate.py) reads the first `train.eval_max_examples` examples sorted
by length, longest first, in chunks of `train.eval_batch_size`: its batches are a
function of the lengths alone.

So the time model prices each task at the distribution of its padded micro-batch length
(matmuls scale with L, attention with L^2, so the real shapes, not the mean length),
computed from the token lengths of its encoded splits (estimate/runtime.py encodes them as
`train` does): exactly for random batches, by running train's own sampler on the lengths
for length-grouped ones, and exactly for evaluation.

A run that draws few batches is priced at those batches themselves. The sampler is a pure
function of (seed, stream, epoch) over the split's lengths in their order, so the estimate
deals the run's first batches as `train` will (`run_batch_lengths`): a 12-step run of
short Chinese reviews drew batches of 39 positions on average where the long-run mean is
64, and priced at the mean its steps cost 1.6x what they did.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from bitblend.data.sampler import BatchSampler
from bitblend.estimate.flops import StepTime, eval_time, step_time
from bitblend.estimate.memory import PrecisionSpec, activation_bytes
from bitblend.estimate.probe import Peaks
from bitblend.estimate.shapes import ModelShape, TaskShape

# Micro-batches drawn when train's length-grouped sampler is simulated: the spread of the
# mean padded length over seeds is below 1% at this count on the users' recipes.
SIMULATED_BATCHES = 4096
MAX_EPOCHS = 256  # tiny splits: at most this many simulated epochs


@dataclass(frozen=True)
class TaskLengths:
    """Text tokens per example of one task's encoded splits, as histograms (length ->
    examples): every training example (packed rows for packed tasks) and the evaluated
    ones (the first train.eval_max_examples of the eval split)."""

    train: dict[int, int]
    eval: dict[int, int]
    # every training example's text tokens in the split's order, which train's sampler
    # permutes: the run's own batches are dealt from it (() where unknown)
    order: tuple[int, ...] = ()

    def to_json(self) -> dict[str, list[Any]]:
        """For a child's stdout line: the histograms as [length, examples] pairs and the
        order as one int per training example."""
        out: dict[str, list[Any]] = {
            k: sorted([L, n] for L, n in h.items()) for k, h in self._splits().items()
        }
        return out | {"order": list(self.order)}

    @classmethod
    def from_json(cls, data: dict[str, list[Any]]) -> TaskLengths:
        """The inverse of to_json."""
        train, ev = ({int(L): int(n) for L, n in data[k]} for k in ("train", "eval"))
        return cls(train, ev, tuple(int(x) for x in data.get("order", ())))

    def _splits(self) -> dict[str, dict[int, int]]:
        return {"train": self.train, "eval": self.eval}


def histogram(lengths: Iterable[int]) -> dict[int, int]:
    """Length -> how many examples have it."""
    return dict(sorted(Counter(int(x) for x in lengths).items()))


def split_lengths(split: Any, limit: int | None = None) -> dict[int, int]:
    """Text tokens of each example of an EncodedSplit (its first `limit`); {} without text."""
    ids = getattr(split, "ids", None)
    if ids is None:
        return {}
    n = len(ids) if limit is None else min(limit, len(ids))
    return histogram(len(ids[i]) for i in range(n))


def split_order(split: Any) -> tuple[int, ...]:
    """Text tokens of each example of an EncodedSplit in its order; () without text."""
    ids = getattr(split, "ids", None)
    return () if ids is None else tuple(len(x) for x in ids)


def padded(length: int, multiple: int) -> int:
    """collate's batch length for a longest row of `length` tokens."""
    return math.ceil(max(1, length) / multiple) * multiple


def _expand(counts: dict[int, int]) -> np.ndarray:
    keys = np.fromiter(counts.keys(), dtype=np.int64)
    return np.repeat(keys, np.fromiter(counts.values(), dtype=np.int64))


def random_batch_lengths(counts: dict[int, int], batch: int, multiple: int) -> dict[int, float]:
    """Distribution of the padded length of a uniformly random `batch`-subset (what one
    micro-batch of a shuffled epoch is): P(max <= x) = C(n_<=x, batch) / C(n, batch), drawn
    without replacement, rounded up to `multiple`. Exact."""
    n = sum(counts.values())
    batch = min(batch, n)
    total = math.comb(n, batch)
    out: dict[int, float] = {}
    below, prev = 0, 0.0  # examples of length <= x, P(max <= x) at the last length seen
    for length in sorted(counts):
        below += counts[length]
        cdf = math.comb(below, batch) / total
        key = padded(length, multiple)
        out[key] = out.get(key, 0.0) + cdf - prev
        prev = cdf
    return {k: v for k, v in out.items() if v > 0}


def grouped_batch_lengths(
    counts: dict[int, int],
    piece: int,
    global_batch: int,
    multiple: int,
    seed: int = 0,
    stream: int = 0,
    group_by_length: bool = True,
) -> dict[int, float]:
    """Distribution of the padded length of train's forward passes: train's BatchSampler
    (seeded as the run seeds it) deals global batches of `global_batch` examples of these
    lengths, each cut into consecutive pieces of `piece` (the micro-batches; a mixed step's
    share of a task), padded to their longest row, over enough epochs for
    SIMULATED_BATCHES pieces: whole epochs, dealt as run_batch_lengths deals a run's."""
    lengths = _expand(counts)
    per_epoch = len(lengths) // global_batch  # BatchSampler drops the incomplete batch
    pieces = math.ceil(global_batch / max(1, min(piece, global_batch)))
    # (max: fewer rows than a batch is left to BatchSampler to refuse, as before)
    epochs = min(MAX_EPOCHS, math.ceil(SIMULATED_BATCHES / (max(1, per_epoch) * pieces)))
    return run_batch_lengths(
        lengths, piece, global_batch, multiple, epochs * per_epoch, seed, stream,
        group_by_length,
    )  # fmt: skip


def run_batch_lengths(
    order: tuple[int, ...] | np.ndarray,
    piece: int,
    global_batch: int,
    multiple: int,
    batches: int,
    seed: int = 0,
    stream: int = 0,
    group_by_length: bool = True,
) -> dict[int, float]:
    """Distribution of the padded length of the micro-batches a run itself draws: the
    first `batches` global batches of train's BatchSampler over the split's lengths in
    their order (seeded as the run seeds it, from the start), each cut into consecutive
    pieces of `piece` (train/step.py splits a step's indices so)."""
    lengths = np.asarray(order, dtype=np.int64)
    sampler = BatchSampler(lengths, global_batch, seed, stream, group_by_length)
    piece = max(1, min(piece, global_batch))
    cuts = list(range(piece, global_batch, piece))
    seen: Counter[int] = Counter()
    for _ in range(batches):
        for part in np.split(lengths[sampler.next()], cuts):
            seen[padded(int(part.max()), multiple)] += 1
    total = sum(seen.values())
    return {k: v / total for k, v in sorted(seen.items())}


def eval_batches(counts: dict[int, int], batch: int, multiple: int) -> dict[tuple[int, int], int]:
    """Evaluation's batches, exactly: (examples, padded length) -> how many batches, the
    examples sorted longest first and cut into chunks of `batch` (train/evaluate.py)."""
    lengths = np.sort(_expand(counts))[::-1]  # longest first
    out: Counter[tuple[int, int]] = Counter()
    for start in range(0, len(lengths), batch):
        chunk = lengths[start : start + batch]
        out[(len(chunk), padded(int(chunk[0]), multiple))] += 1
    return dict(out)


@dataclass(frozen=True)
class PricedLengths:
    """The lengths one task is priced at: a distribution of a training micro-batch's
    positions (text padded + patches / features / audio) and evaluation's batches."""

    train: dict[int, float]  # positions -> probability
    eval: dict[tuple[int, int], int]  # (examples, positions) -> batches
    worst: int  # positions at max_length (what memory is priced at)
    # "data": from the encoded splits; "fixed": no text, every row the same positions
    # (patches, features); "worst": lengths unknown (a streamed task), priced at max_length
    source: str
    # global batches of the run dealt one by one (run_batch_lengths); 0: the sampler's
    # long-run distribution
    run_batches: int = 0

    @property
    def measured(self) -> bool:
        """Priced at the data's lengths (not the worst case)."""
        return self.source == "data"

    @property
    def mean_train(self) -> float:
        """Expected positions of a training micro-batch."""
        return sum(L * p for L, p in self.train.items())

    @property
    def mean_eval(self) -> float:
        """Positions of an evaluated example's batch, averaged over examples."""
        n = sum(b * k for (b, _), k in self.eval.items())
        return sum(b * k * L for (b, L), k in self.eval.items()) / n if n else 0.0


def priced_lengths(
    task: TaskShape,
    lengths: TaskLengths | None,
    *,
    piece: int,
    global_batch: int,
    multiple: int,
    eval_batch: int,
    seed: int,
    stream: int,
    group_by_length: bool,
    text_worst: int,
    batches: int = 0,
) -> PricedLengths:
    """`task`'s priced lengths from its measured token lengths, or the worst case (every
    example `task.seq` positions) when they are unknown or the task has no text.
    `text_worst` is the text part of task.seq (max_length padded, 0 without text); the rest
    (patches, features, audio) is the same for every example. `batches`: the global
    batches the run draws from this task, when that is few enough (at most
    SIMULATED_BATCHES micro-batches) to deal them one by one from the lengths' order."""
    full_eval: dict[tuple[int, int], int] = {}
    if task.eval_examples:
        full, rest = divmod(task.eval_examples, eval_batch)
        full_eval = {(eval_batch, task.seq): full} | ({(rest, task.seq): 1} if rest else {})
    if lengths is None or not lengths.train:
        fixed = lengths is not None and text_worst == 0
        return PricedLengths({task.seq: 1.0}, full_eval, task.seq, "fixed" if fixed else "worst")
    extra = task.seq - text_worst
    pieces = batches * math.ceil(global_batch / max(1, piece))
    dealt = batches if 0 < pieces <= SIMULATED_BATCHES and len(lengths.order) >= global_batch else 0
    if dealt:
        train = run_batch_lengths(
            lengths.order, piece, global_batch, multiple, batches, seed, stream, group_by_length
        )
    elif group_by_length:
        train = grouped_batch_lengths(
            lengths.train, piece, global_batch, multiple, seed, stream, True
        )
    else:
        train = random_batch_lengths(lengths.train, piece, multiple)
    evals = eval_batches(lengths.eval, eval_batch, multiple) if lengths.eval else {}
    return PricedLengths(
        {L + extra: p for L, p in train.items()},
        {(b, L + extra): k for (b, L), k in evals.items()},
        task.seq,
        "data",
        dealt,
    )


def priced_step_time(
    shape: ModelShape,
    task: TaskShape,
    priced: PricedLengths,
    spec: PrecisionSpec,
    peaks: Peaks,
    *,
    grad_accum: int = 1,
    states: int = 2,
    device: str = "cpu",
) -> StepTime:
    """Expected seconds per optimizer step: flops.step_time at each micro-batch length,
    weighted by its probability (each micro-batch of a step draws its own length; the
    optimizer's share does not depend on it)."""
    parts: dict[str, float] = {}
    for seq, p in priced.train.items():
        t = replace(task, seq=seq)
        acts = activation_bytes(shape, t, spec, device)
        one = step_time(
            shape, t, spec, acts, peaks, grad_accum=grad_accum, states=states, device=device
        )
        for k, v in one.parts.items():
            parts[k] = parts.get(k, 0.0) + p * v
    return StepTime(parts)


def priced_eval_time(
    shape: ModelShape,
    task: TaskShape,
    priced: PricedLengths,
    spec: PrecisionSpec,
    peaks: Peaks,
    device: str = "cpu",
) -> float:
    """Seconds of one evaluation of `task`: flops.eval_time of each of its batches."""
    seconds = 0.0
    for (examples, seq), count in priced.eval.items():
        one = TaskShape(task.name, task.head, task.outputs, examples, seq, eval_examples=examples)
        acts = activation_bytes(shape, one, spec, device)
        seconds += count * eval_time(shape, one, spec, acts, peaks, examples, device)
    return seconds
