"""The SYNTHETIC `spoken_words` source: deterministic by seed, eval voices never in training,
and a one-line install hint without eSpeak NG. Small clip counts: the real set is 3,360."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from bitblend.data import spoken_words as sw
from bitblend.errors import BitblendError

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install espeak-ng)"
)


@pytest.mark.slow  # 120 espeak-ng runs, ~3 s on an idle 2-core machine
@needs_espeak
def test_deterministic_by_seed_and_voice_disjoint() -> None:
    voices = sw.VOICES[:4]
    a = sw.generate(seed=3, voices=voices, clips_per_word=1, eval_voices=1, workers=2)
    b = sw.generate(seed=3, voices=voices, clips_per_word=1, eval_voices=1, workers=1)
    clips, words, who, held = a
    assert len(clips) == 4 * len(sw.WORDS) and sorted(set(words)) == sorted(sw.WORDS)
    assert words == b[1] and who == b[2] and held == b[3]
    assert all(np.array_equal(x, y) for x, y in zip(clips, b[0], strict=True))  # bit for bit
    assert all(x.dtype == np.float32 and 0.1 * sw.RATE < len(x) < 1.2 * sw.RATE for x in clips)
    src = sw.split_by_voice(*a)
    assert src.eval is not None and src.synthetic
    train_voices = {who[i] for i in src.train.rows}  # type: ignore[union-attr]
    eval_voices = {who[i] for i in src.eval.rows}  # type: ignore[union-attr]
    assert eval_voices == set(held) and len(held) == 1 and not train_voices & eval_voices
    assert len(src.train) + len(src.eval) == len(clips)
    c = sw.generate(seed=4, voices=voices, clips_per_word=1, eval_voices=1, workers=2)
    assert any(not np.array_equal(x, y) for x, y in zip(clips, c[0], strict=True))


def test_missing_espeak_is_one_line_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BitblendError) as err:
        sw.generate(seed=0, voices=sw.VOICES[:2], clips_per_word=1, eval_voices=1)
    assert "apt-get install espeak-ng" in str(err.value) and "\n" not in str(err.value)
