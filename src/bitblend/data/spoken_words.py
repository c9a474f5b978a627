"""`spoken_words`: a SYNTHETIC labelled speech set, ten words spoken by eSpeak NG voices.

Nothing here is recorded speech. The generative process, so that results can be read:

1. Words: yes, no, up, down, left, right, on, off, stop, go (the ten command words of
   Google Speech Commands' core set), one class each.
2. Speakers ("voices"): eSpeak NG voice variants (`espeak-ng --voices=variant`; m1, f3,
   klatt2, Annie, ...): each has its own formants, breathiness and base pitch. The split
   holds out whole voices: `EVAL_VOICES` of them, chosen by the seed, are the eval split
   and never speak in training (a speaker-independent test).
3. Each clip: the voice speaks one word with an accent drawn from `ACCENTS` (en-us,
   en-gb-x-rp, en-gb-scotland, ...), a speed of 120-220 words per minute and a pitch of
   20-80 (espeak's 0-99 scale). Silence at both ends is trimmed, a random 0-150 ms of
   silence is put in front, the clip is resampled to 16 kHz (espeak speaks at 22,050 Hz),
   peak-normalised to 0.5 and white Gaussian noise is added at a signal-to-noise ratio
   drawn from {clean, 20, 10, 5} dB.

Deterministic for a seed: every draw comes from `numpy.random.Generator`s seeded by (seed,
clip) and espeak-ng's output for fixed arguments is fixed (checked by the tests). 48 voices
x 10 words x 7 clips = 3,360 clips (2,660 train / 700 eval); the first build synthesises
them with a few espeak-ng processes at once (~30 s on 2 cores) and caches them as int16
under the bitblend cache directory (~/.cache/bitblend, or $BITBLEND_CACHE_DIR).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bitblend.data.audio import resample
from bitblend.data.table import SourceData, Table
from bitblend.errors import BitblendError

WORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
ACCENTS = ["en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc",
           "en-gb-x-gbclan", "en-gb-x-gbcwmd"]  # fmt: skip
# Variants shipped with eSpeak NG 1.51 (novelty voices such as whisper, croak, Demonic
# and the robots are left out: they are effects, not speakers).
VOICES = ["Alex", "Alicia", "Andrea", "Andy", "Annie", "Denis", "Diogo", "Gene",
          "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael", "Mike", "Nguyen",
          "Storm", "adam", "anika", "announcer", "antonio", "aunty", "belinda", "benjamin",
          "boris", "caleb", "david", "ed", "edward", "f1", "f2", "f3", "f4", "f5", "grandma",
          "grandpa", "iven", "john", "klatt", "klatt2", "linda", "m1", "m2", "m3", "m4",
          "m5", "m6"]  # fmt: skip
EVAL_VOICES = 10
CLIPS_PER_WORD = 7
RATE = 16000
ESPEAK_RATE = 22050
SNRS = [None, 20.0, 10.0, 5.0]  # dB; None = clean
VERSION = 1  # bump when the generator changes: cached sets of older versions are ignored


def cache_dir() -> Path:
    """~/.cache/bitblend, or $BITBLEND_CACHE_DIR (the estimate probe's cache too)."""
    env = os.environ.get("BITBLEND_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bitblend"


def espeak_binary() -> str:
    """The espeak-ng executable, or a one-line error saying how to install it."""
    found = shutil.which("espeak-ng")
    if found is None:
        raise BitblendError(
            "spoken_words: needs the eSpeak NG synthesiser (apt-get install espeak-ng)"
        )
    return found


def _speak(binary: str, voice: str, speed: int, pitch: int, word: str) -> np.ndarray:
    """One word from espeak-ng as float32 samples at its native 22,050 Hz."""
    import soundfile as sf

    cmd = [binary, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word]
    done = subprocess.run(cmd, capture_output=True, check=False, timeout=60)
    if done.returncode != 0 or len(done.stdout) < 100:
        why = done.stderr.decode(errors="replace").strip().splitlines()
        raise BitblendError(
            f"spoken_words: espeak-ng -v {voice} failed ({why[0] if why else 'no audio'})"
        )
    # espeak writes a streaming WAV header (unknown length); soundfile reads it to the end.
    data, rate = sf.read(io.BytesIO(done.stdout), dtype="float32")
    if rate != ESPEAK_RATE:
        return resample(data, int(rate), ESPEAK_RATE)
    return data


def _finish(raw: np.ndarray, rng: np.random.Generator, snr: float | None) -> np.ndarray:
    """Trim silence, prepend 0-150 ms, resample to 16 kHz, normalise, add noise."""
    loud = np.flatnonzero(np.abs(raw) > 0.02 * max(float(np.abs(raw).max()), 1e-9))
    if loud.size:
        margin = int(0.02 * ESPEAK_RATE)
        raw = raw[max(0, loud[0] - margin) : loud[-1] + margin]
    wave = resample(raw, ESPEAK_RATE, RATE)
    lead = np.zeros(int(rng.integers(0, int(0.15 * RATE))), dtype=np.float32)
    wave = np.concatenate([lead, wave])
    wave = 0.5 * wave / max(float(np.abs(wave).max()), 1e-9)
    if snr is not None:
        power = float(np.mean(wave**2))
        wave = wave + rng.normal(0.0, np.sqrt(power / 10 ** (snr / 10)), wave.shape)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def generate(
    seed: int = 0,
    voices: list[str] | None = None,
    clips_per_word: int = CLIPS_PER_WORD,
    eval_voices: int = EVAL_VOICES,
    workers: int | None = None,
) -> tuple[list[np.ndarray], list[str], list[str], list[str]]:
    """(clips at 16 kHz, words, voices, eval voices), uncached; deterministic for a seed."""
    binary = espeak_binary()
    voices = list(VOICES if voices is None else voices)
    if not 0 < eval_voices < len(voices):
        raise BitblendError(f"spoken_words: {eval_voices} eval voices of {len(voices)}")
    rng = np.random.default_rng([seed, 2026])
    held = sorted(voices[i] for i in rng.permutation(len(voices))[:eval_voices])
    plan = []  # (voice, word, accent, speed, pitch, snr index), all drawn before synthesis
    for voice in voices:
        for word in WORDS:
            for _ in range(clips_per_word):
                plan.append((voice, word, ACCENTS[int(rng.integers(len(ACCENTS)))],
                             int(rng.integers(120, 221)), int(rng.integers(20, 81)),
                             int(rng.integers(len(SNRS)))))  # fmt: skip
    # espeak-ng runs as separate processes: a few at once keep the cores busy while each
    # one starts (~15 ms); more only contend for the same cores.
    workers = workers or min(4, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        raws = list(pool.map(lambda p: _speak(binary, f"{p[2]}+{p[0]}", p[3], p[4], p[1]), plan))
    clips = [
        _finish(raw, np.random.default_rng([seed, 7, i]), SNRS[p[5]])
        for i, (raw, p) in enumerate(zip(raws, plan, strict=True))
    ]
    return clips, [p[1] for p in plan], [p[0] for p in plan], held


def _cached(seed: int) -> tuple[list[np.ndarray], list[str], list[str], list[str]]:
    path = cache_dir() / f"spoken_words-v{VERSION}-seed{seed}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                ends = np.cumsum(z["lengths"])
                flat = z["samples"].astype(np.float32) / 32767.0
                clips = np.split(flat, ends[:-1])
                return (clips, [str(w) for w in z["words"]], [str(v) for v in z["voices"]],
                        [str(v) for v in z["held"]])  # fmt: skip
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache file is rebuilt below
    clips, words, voices, held = generate(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, samples=np.concatenate([np.round(c * 32767).astype(np.int16) for c in clips]),
             lengths=np.array([len(c) for c in clips]), words=np.array(words),
             voices=np.array(voices), held=np.array(held))  # fmt: skip
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return _cached(seed)  # read back, so a first run and a cached run see the same int16 clips


def split_by_voice(
    clips: list[np.ndarray], words: list[str], voices: list[str], held: list[str]
) -> SourceData:
    """Train on every voice but `held`, evaluate on `held` only."""
    ev = np.array([v in set(held) for v in voices])

    def table(mask: np.ndarray) -> Table:
        idx = np.flatnonzero(mask)
        return Table(labels=[words[i] for i in idx], audio=[clips[i] for i in idx],
                     audio_rate=RATE, rows=idx)  # fmt: skip

    return SourceData(
        table(~ev),
        eval=table(ev),
        label_names=sorted(WORDS),
        synthetic=True,
        description="SYNTHETIC spoken words (eSpeak NG), eval voices held out",
    )


def spoken_words(seed: int = 0) -> SourceData:
    """The built-in source: cached after the first build."""
    return split_by_voice(*_cached(seed))
