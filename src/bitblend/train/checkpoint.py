"""Atomic, verified checkpoints: tensors in safetensors, everything else in JSON.

A checkpoint is written into `checkpoints/.tmp-step-N-*`, every file fsynced, then renamed
to `checkpoints/step-N`. An existing `step-N` is first renamed aside (`.old-step-N-*`), then
the new one takes its name, then the old one is deleted: at every instant one complete
`step-N` exists or can be restored from the aside copy (`clean_stale` does that). Pruning
renames a checkpoint to `.del-step-N-*` before deleting it, so a half-deleted checkpoint
never carries a `step-N` name.

Nested state (optimizer, scaler, sampler, RNG, precision) is flattened: each tensor goes
into `state.safetensors` under its path and is replaced by a reference in `state.json`.
`state.json` records the SHA-256 and size of both safetensors files and a SHA-256 of its own
content; `load_checkpoint` verifies all three before touching the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import nn

from bitblend.errors import BitblendError
from bitblend.fsutil import apply_umask, crash_point, disk_error, fsync_path, is_disk_error

_STEP_DIR = re.compile(r"^step-(\d+)$")
_ASIDE = re.compile(r"^\.old-(step-\d+)-")
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
META_FILE = "state.json"
FORMAT = 2  # 1: no checksums (bitblend <= 0.x); still loadable, not verifiable
_HASHED = (MODEL_FILE, STATE_FILE)


class CorruptCheckpoint(BitblendError):
    """A checkpoint that is incomplete, unreadable or fails its checksums."""


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested structure by {"__tensor__": key}; tuples are tagged."""
    if isinstance(obj, torch.Tensor):
        # clone(): safetensors refuses two entries sharing one storage.
        tensors[path] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_flatten(k, f"{path}.k{i}", tensors), _flatten(v, f"{path}.{i}", tensors)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, float) and obj != obj:
        return {"__float__": "nan"}
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return {"__float__": str(obj)}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _canonical(doc: dict[str, Any]) -> bytes:
    """The bytes `state.json`'s own checksum covers: the document minus that checksum."""
    body = {k: v for k, v in doc.items() if k != "sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def model_tensors(
    model: nn.Module, keep: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """The model's state as distinct contiguous tensors (tied weights stored once); only the
    keys `keep` accepts when given (adapter runs: not the frozen base)."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[object, str] = {}
    for name, t in model.state_dict().items():
        if keep is not None and not keep(name):
            continue
        # Tied = the very same view (pointer incl. offset, shape, stride), not just one storage.
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride())) if t.numel() else id(t)
        if key in seen and t.numel():
            continue  # a tied weight: load_state_dict(strict=False) restores it through its twin
        seen[key] = name
        out[name] = t.detach().cpu().contiguous()
    return out


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    state: dict[str, Any],
    keep: Callable[[str], bool] | None = None,
) -> Path:
    """Write checkpoint `step-N` atomically, with checksums (model keys `keep` accepts:
    adapter runs leave out the frozen base); returns its path.

    A disk that is full or read-only raises a one-line BitblendError saying how much the
    checkpoint needed; nothing of the attempt is left and older checkpoints are untouched.
    """
    weights = model_tensors(model, keep)
    tensors: dict[str, torch.Tensor] = {}
    meta = _flatten(state, "s", tensors)  # before any write: an unstorable state costs nothing
    needed = _nbytes(weights) + _nbytes(tensors)
    tmp: Path | None = None
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=ckpt_root))
        save_file(weights, str(tmp / MODEL_FILE))
        crash_point("save:model-written")
        save_file(tensors, str(tmp / STATE_FILE))
        files = {n: {"sha256": _sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size}
                 for n in _HASHED}  # fmt: skip
        doc = {"format": FORMAT, "step": step, "files": files, "state": meta}
        doc["sha256"] = hashlib.sha256(_canonical(doc)).hexdigest()
        (tmp / META_FILE).write_text(json.dumps(doc, allow_nan=False))
        for f in tmp.iterdir():
            apply_umask(f)
            fsync_path(f)
        apply_umask(tmp, directory=True)
        fsync_path(tmp)
        crash_point("save:before-rename")
        final = ckpt_root / f"step-{step}"
        aside = None
        if final.exists():  # re-saving a step: move the old one aside, never delete it first
            aside = Path(tempfile.mkdtemp(prefix=f".old-step-{step}-", dir=ckpt_root))
            os.rename(final, aside / final.name)
            crash_point("save:old-aside")
        os.rename(tmp, final)
        tmp = None
        fsync_path(ckpt_root)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except (OSError, SafetensorError) as exc:
        os_exc = _as_os_error(exc)
        if os_exc is not None and is_disk_error(os_exc):
            raise disk_error(os_exc, f"checkpoint step-{step}", ckpt_root, needed) from None
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _as_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind an exception; safetensors (Rust) reports it as text only."""
    if isinstance(exc, OSError):
        return exc
    m = re.search(r"os error (\d+)", str(exc))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else None


def step_of(path: Path) -> int:
    """N of a `step-N` directory."""
    m = _STEP_DIR.match(path.name)
    if not m:
        raise ValueError(f"{path} is not a step-N directory")
    return int(m.group(1))


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Every `step-N` directory, oldest first (intact or not: `verify_checkpoint` decides)."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for d in ckpt_root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    return sorted(found)


def clean_stale(ckpt_root: Path) -> list[str]:
    """Finish what a killed process left: returns one notice per thing done.

    `.tmp-step-*` (a save that never completed) and `.del-step-*` (a prune cut short) are
    deleted; `.old-step-N-*` (a replacement cut between its two renames) is put back as
    `step-N` when no `step-N` exists, and deleted otherwise.
    """
    notes: list[str] = []
    if not ckpt_root.is_dir():
        return notes
    for d in sorted(ckpt_root.iterdir()):
        if d.name.startswith((".tmp-step-", ".del-step-")):
            shutil.rmtree(d, ignore_errors=True)
            notes.append(f"removed {d.name} (left by an interrupted save or prune)")
        elif m := _ASIDE.match(d.name):
            inner, final = d / m.group(1), ckpt_root / m.group(1)
            if inner.is_dir() and not final.exists():
                os.rename(inner, final)
                notes.append(f"restored {final.name} (its replacement was interrupted)")
            shutil.rmtree(d, ignore_errors=True)
    return notes


def _read_doc(path: Path) -> dict[str, Any]:
    meta = path / META_FILE
    if not meta.is_file():
        raise CorruptCheckpoint(f"{path}: incomplete checkpoint (no {META_FILE})")
    try:
        doc = json.loads(meta.read_bytes())
    except (OSError, ValueError) as exc:
        raise CorruptCheckpoint(f"{path}: unreadable {META_FILE} ({exc})") from None
    if not isinstance(doc, dict) or "step" not in doc or "state" not in doc:
        raise CorruptCheckpoint(f"{path}: {META_FILE} is not a bitblend checkpoint")
    if "sha256" in doc and hashlib.sha256(_canonical(doc)).hexdigest() != doc["sha256"]:
        raise CorruptCheckpoint(f"{path}: {META_FILE} fails its SHA-256 check")
    return doc


def _read_file(path: Path, name: str, doc: dict[str, Any]) -> bytes:
    """A safetensors file's bytes, checked against the size and SHA-256 in state.json."""
    f = path / name
    try:
        raw = f.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path}: incomplete checkpoint (no {name})") from None
    except OSError as exc:
        raise CorruptCheckpoint(f"{path}: unreadable {name} ({exc})") from None
    want = doc.get("files", {}).get(name)
    if want is None:
        if doc.get("format", 1) >= FORMAT:
            raise CorruptCheckpoint(f"{path}: {META_FILE} records no checksum for {name}")
        return raw  # a format-1 checkpoint: nothing recorded to check against
    if len(raw) != want["bytes"]:
        raise CorruptCheckpoint(
            f"{path}: {name} is {len(raw)} bytes, {want['bytes']} were written (truncated?)"
        )
    if hashlib.sha256(raw).hexdigest() != want["sha256"]:
        raise CorruptCheckpoint(f"{path}: {name} fails its SHA-256 check (corrupted on disk)")
    return raw


def verify_checkpoint(path: Path) -> int:
    """Check a checkpoint's files against its recorded checksums; returns its step."""
    doc = _read_doc(path)
    for name in _HASHED:
        _read_file(path, name, doc)
    return int(doc["step"])


def prune_checkpoints(ckpt_root: Path, keep: int, known_good: int | None = None) -> None:
    """Delete all but the newest `keep` checkpoints (keep=0 keeps all).

    Never deletes the last intact one: when no kept checkpoint verifies, the newest intact
    one among the doomed is kept as well. `known_good` (a step just written or just loaded)
    is trusted without re-reading it, so the common case hashes nothing.
    """
    if keep <= 0:
        return
    found = list_checkpoints(ckpt_root)
    doomed, kept = found[:-keep], found[-keep:]

    def intact(step: int, path: Path) -> bool:
        if step == known_good:
            return True
        try:
            verify_checkpoint(path)
        except BitblendError:
            return False
        return True

    if doomed and not any(intact(s, p) for s, p in reversed(kept)):
        for item in reversed(doomed):
            if intact(*item):
                doomed.remove(item)
                break
    for _, path in doomed:
        aside = Path(tempfile.mkdtemp(prefix=f".del-{path.name}-", dir=ckpt_root))
        os.rename(path, aside / path.name)  # from here on it no longer looks like a checkpoint
        crash_point("prune:aside")
        shutil.rmtree(aside, ignore_errors=True)


def load_checkpoint(
    path: Path, model: nn.Module, keep: Callable[[str], bool] | None = None
) -> tuple[int, dict[str, Any]]:
    """Verify, then load weights into `model` (the keys `keep` accepts are required, the
    others stay as built); returns (step, the nested state dict).

    Raises CorruptCheckpoint (before the model is touched) when a file is missing,
    truncated, unparseable or fails its checksum.
    """
    doc = _read_doc(path)
    try:
        tensors = load(_read_file(path, STATE_FILE, doc))
        weights = load(_read_file(path, MODEL_FILE, doc))
    except (ValueError, SafetensorError) as exc:
        raise CorruptCheckpoint(f"{path}: unreadable checkpoint ({exc})") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {n for n in missing if (keep is not None and not keep(n)) or _is_tied(model, n, weights)}
    if set(missing) - tied or unexpected:
        raise BitblendError(
            f"{path}: checkpoint does not match the model "
            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    try:
        return int(doc["step"]), _unflatten(doc["state"], tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpoint(f"{path}: {META_FILE} refers to missing tensors ({exc})") from None


def load_newest_intact(
    ckpt_root: Path, load_one: Callable[[Path], int], notice: Callable[[str], None]
) -> int | None:
    """Run `load_one` on the newest checkpoint it accepts, falling back one at a time.

    Each checkpoint passed over gets one `notice` line saying why. Returns the loaded step,
    None when there are no checkpoints at all; raises one line naming every step tried when
    none is intact.
    """
    found = list_checkpoints(ckpt_root)
    tried: list[str] = []
    for step, path in reversed(found):
        try:
            got = load_one(path)
        except BitblendError as exc:
            tried.append(f"step-{step}: {str(exc).removeprefix(f'{path}: ')}")
            notice(f"skipping checkpoint {path.name}: {tried[-1].split(': ', 1)[1]}")
            continue
        if tried:
            notice(f"resuming from step-{got}, the newest intact checkpoint")
        return got
    if tried:
        raise BitblendError(f"{ckpt_root}: no intact checkpoint (tried {'; '.join(tried)})")
    return None


def _is_tied(model: nn.Module, name: str, saved: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    t0 = state[name]
    key = (t0.data_ptr(), tuple(t0.shape), tuple(t0.stride()))
    return any(
        k in saved and (t.data_ptr(), tuple(t.shape), tuple(t.stride())) == key
        for k, t in state.items()
        if k != name
    )
