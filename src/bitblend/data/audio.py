"""Audio from files: decode (soundfile), mix down to mono, resample, cut or pad; audio folders.

A source keeps its clips at their own length and one sample rate (`Table.audio_rate`);
encoding (`fit_clips`) resamples them to the task's rate and cuts or pads them to its
length. Padding is NaN, the project's mark for "no data here": the model turns it into
zeros and a per-clip length, and masks the patches that hold only padding.
"""

from __future__ import annotations

import re
from math import gcd
from pathlib import Path

import numpy as np

from bitblend.data.folders import class_folder
from bitblend.data.table import SourceData, Table
from bitblend.errors import BitblendError, cut

EXTENSIONS = {".wav", ".flac", ".ogg"}


def resample(wave: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """A 1-D signal from `source_rate` to `target_rate` Hz (polyphase, anti-aliased)."""
    if source_rate == target_rate or wave.size == 0:
        return wave.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = gcd(source_rate, target_rate)
    return resample_poly(wave, target_rate // g, source_rate // g).astype(np.float32)


def load_audio(path: Path, rate: int) -> np.ndarray:
    """(samples,) float32 mono at `rate` Hz; a one-line error naming the file if unreadable."""
    import soundfile as sf

    if rate < 1:
        raise BitblendError(f"sample_rate: expected a positive number of Hz, got {rate}")
    if not path.is_file():
        raise BitblendError(f"{path}: audio file not found")
    try:
        data, source_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        # libsndfile says "Error opening '<path>': Format not recognised.": keep the why.
        why = re.sub(r"^Error opening .*?: ", "", first).rstrip(".")
        raise BitblendError(f"{path}: cannot decode audio ({cut(why, 100)})") from None
    if data.shape[0] == 0:
        raise BitblendError(f"{path}: the audio file holds no samples")
    mono = data.mean(axis=1)  # (samples, channels) -> (samples,): mixdown by the mean
    if not np.isfinite(mono).all():
        raise BitblendError(f"{path}: audio holds non-finite samples (NaN or inf)")
    return resample(mono, int(source_rate), rate)


def load_audios(paths: list[Path | None], rate: int) -> list[np.ndarray]:
    """Every file decoded at `rate`; None (a blank cell of a multimodal row) is an empty clip."""
    if not paths:
        raise BitblendError("no audio files to load")
    empty = np.zeros(0, dtype=np.float32)
    return [empty if p is None else load_audio(p, rate) for p in paths]


def load_audio_folder(path: Path, rate: int) -> SourceData:
    """`path/<class>/<clip>` -> audio table labelled by sub-folder name (sorted, stable)."""
    files, labels, found = class_folder(
        path,
        EXTENSIONS,
        "audio",
        "no audio found; expected one sub-folder per class holding "
        f"{', '.join(sorted(EXTENSIONS))} files",
    )
    return SourceData(
        Table(labels=labels, audio=load_audios(list(files), rate), audio_rate=rate),
        label_names=found,
        description=f"audio folder {path.name}",
    )


def is_audio_folder(path: Path) -> bool:
    """Whether a directory's class sub-folders hold audio files (rather than images)."""
    for d in sorted(path.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            for f in sorted(d.iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    return f.suffix.lower() in EXTENSIONS
    return False


def fit_clips(clips: list[np.ndarray], source_rate: int, rate: int, num_samples: int) -> np.ndarray:
    """(n, num_samples) float32: each clip resampled to `rate`, cut or NaN-padded."""
    out = np.full((len(clips), num_samples), np.nan, dtype=np.float32)
    for i, clip in enumerate(clips):
        wave = resample(np.asarray(clip, dtype=np.float32), source_rate, rate)[:num_samples]
        out[i, : len(wave)] = wave
    return out
