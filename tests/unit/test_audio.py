"""Audio: decoding and resampling against known tones, log-mels, patch masking, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from bitblend.data.audio import fit_clips, is_audio_folder, load_audio, load_audio_folder
from bitblend.data.modalities import collate, encode_split
from bitblend.data.table import Table
from bitblend.errors import BitblendError
from bitblend.models.audio import AudioEmbedding, LogMel, hz_to_mel, mel_to_hz
from bitblend.models.backbones import load_backbone_with_head
from bitblend.models.trunk import HeadSpec, MultiTaskModel, embedding_rms


def tone(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


def test_440hz_sine_peaks_in_its_mel_band() -> None:
    """The loudest band of a 440 Hz tone is the one whose centre is nearest 440 Hz."""
    n_mels, rate = 64, 16000
    centres = mel_to_hz(torch.linspace(0, float(hz_to_mel(torch.tensor(8000.0))), n_mels + 2))
    want = int((centres[1:-1] - 440.0).abs().argmin())
    wave = torch.from_numpy(tone(440.0, 1.0, rate))[None]
    mel, frames = LogMel(rate, n_mels)(wave, torch.tensor([rate]))
    assert mel.shape == (1, 101, n_mels) and int(frames) == 100  # centres inside the clip
    bands = mel[0, 10:-10].argmax(dim=1)  # every inner frame
    assert bool((bands == want).all()), (want, bands.unique())
    # 1 kHz lands in a higher band: the scale is not stuck.
    mel2, _ = LogMel(rate, n_mels)(torch.from_numpy(tone(1000.0, 1.0, rate))[None],
                                   torch.tensor([rate]))  # fmt: skip
    assert int(mel2[0, 50].argmax()) > want


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg"])
def test_decode_mixdown_resample_known_tone(tmp_path: Path, ext: str) -> None:
    """A 44.1 kHz stereo file (1 kHz tone left, silence right) -> 16 kHz mono tone of half
    the amplitude, same duration, same pitch."""
    rate = 44100
    left = tone(1000.0, 0.5, rate, amp=0.8)
    path = tmp_path / f"t.{ext}"
    sf.write(path, np.stack([left, np.zeros_like(left)], axis=1), rate)
    wave = load_audio(path, 16000)
    assert wave.dtype == np.float32 and abs(len(wave) - 8000) <= 1
    assert peak_hz(wave, 16000) == pytest.approx(1000.0, abs=4.0)
    core = wave[1000:-1000]  # away from the resampling filter's edges
    assert float(np.abs(core).max()) == pytest.approx(0.4, abs=0.03 if ext == "ogg" else 0.005)
    up = load_audio(path, 48000)  # upsampling keeps the pitch too
    assert abs(len(up) - 24000) <= 1 and peak_hz(up, 48000) == pytest.approx(1000.0, abs=4.0)


def test_corrupt_empty_and_missing_files_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage that is not a wave file at all")
    empty = tmp_path / "empty.flac"
    empty.write_bytes(b"")
    silent = tmp_path / "zero.wav"
    sf.write(silent, np.zeros((0, 1), dtype=np.float32), 16000)
    cases = [(bad, "cannot decode audio"), (empty, "cannot decode audio"),
             (silent, "holds no samples"), (tmp_path / "gone.wav", "not found")]  # fmt: skip
    for path, why in cases:
        with pytest.raises(BitblendError) as err:
            load_audio(path, 16000)
        msg = str(err.value)
        assert msg.startswith(f"{path}: ") and why in msg and "\n" not in msg, msg


def test_audio_folder_round_trip(tmp_path: Path) -> None:
    for cls, freq in [("high", 2000.0), ("low", 300.0)]:
        (tmp_path / cls).mkdir()
        for i in range(2):
            sf.write(tmp_path / cls / f"{i}.wav", tone(freq, 0.25 + 0.1 * i, 8000), 8000)
    (tmp_path / "low" / "notes.txt").write_text("ignored")
    assert is_audio_folder(tmp_path)
    src = load_audio_folder(tmp_path, 16000)
    assert src.train.labels == ["high", "high", "low", "low"] and src.label_names == ["high", "low"]
    assert src.train.modalities == ["audio"] and src.train.audio is not None
    assert [len(c) for c in src.train.audio] == [4000, 5600, 4000, 5600]
    fitted = fit_clips(src.train.audio, 16000, 16000, 5000)  # cut the long, NaN-pad the short
    assert fitted.shape == (4, 5000) and np.isnan(fitted[0, 4000:]).all()
    assert not np.isnan(fitted[1]).any()


def _model(num_samples: int, seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    backbone, _, _ = load_backbone_with_head("tiny-bert", None, 0.0, 0.0, "torch")
    spec = HeadSpec("a", "classification", 3, ["x", "y", "z"], ["audio"], sample_rate=16000,
                    num_samples=num_samples, n_mels=32, patch_frames=8, patch_mels=8)  # fmt: skip
    return MultiTaskModel(backbone, [spec]).eval()


def test_padded_patches_are_masked_and_change_nothing() -> None:
    """A 0.3 s clip padded to 1.0 s (with junk past its end) or to 0.5 s: the patches of
    padding are masked, and the logits are the same."""
    model = _model(16000)
    clip = tone(600.0, 0.3, 16000) + np.random.default_rng(0).normal(0, 0.05, 4800).astype(
        np.float32
    )
    long_split = encode_split(Table(labels=[0], audio=[clip]), "classification",
                              np.zeros(1, np.int64), audio=(16000, 16000, 52))  # fmt: skip
    short_split = encode_split(Table(labels=[0], audio=[clip]), "classification",
                               np.zeros(1, np.int64), audio=(16000, 8000, 28))  # fmt: skip
    long_b, short_b = collate(long_split, [0], 0, 1), collate(short_split, [0], 0, 1)
    assert long_b["audio"].shape == (1, 16000) and int(long_b["audio_len"]) == 4800
    long_b["audio"][0, 4800:] = 7.0  # junk past the clip's end must not leak in
    embed = model.adapters["a"]["audio"]
    _, mask = embed(long_b["audio"], long_b["audio_len"])
    # 30 frames (centres at 0..4640) hold signal: time patches 0..3 (first frames 0, 8, 16,
    # 24) start inside it, 4..12 do not; 4 frequency patches each.
    assert mask.shape == (1, 13 * 4) and mask[0].tolist() == [1] * 16 + [0] * 36
    with torch.no_grad():
        a = model("a", **long_b)
        b = model("a", **short_b)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # ... while the clip itself does matter.
    other = dict(long_b, audio=long_b["audio"] * 0 + torch.from_numpy(tone(3000, 1.0, 16000)))
    with torch.no_grad():
        assert not torch.allclose(model("a", **other), a, atol=1e-3)


def test_spec_augment_only_while_training() -> None:
    embed = AudioEmbedding(16000, 16000, 32, 8, 8, 16, augment=True)
    wave = torch.from_numpy(np.stack([tone(500, 1.0, 16000), tone(900, 1.0, 16000)]))
    lengths = torch.tensor([16000, 16000])
    embed.eval()
    a, _ = embed(wave, lengths)
    b, _ = embed(wave, lengths)
    assert torch.equal(a, b)  # eval: no masking, deterministic
    embed.train()
    torch.manual_seed(0)
    c, _ = embed(wave, lengths)
    assert not torch.equal(a, c)  # some time/frequency stripes were masked


def test_corrupt_clip_in_a_path_column_names_the_file(tmp_path: Path) -> None:
    """A recipe's CSV whose audio column names a corrupt file: one line naming that file."""
    from bitblend.config.schema import TaskConfig
    from bitblend.data.sources import load_task_data

    sf.write(tmp_path / "ok.wav", tone(440.0, 0.2, 8000), 8000)
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    (tmp_path / "a.csv").write_text("clip,label\nok.wav,a\nbad.wav,b\nok.wav,a\n")
    task = TaskConfig(name="t", data=str(tmp_path / "a.csv"), modality="audio",
                      audio_column="clip")  # fmt: skip
    with pytest.raises(BitblendError) as err:
        load_task_data(task, 0, 0)
    assert str(err.value).startswith(f"{tmp_path / 'bad.wav'}: cannot decode audio")
    (tmp_path / "a.csv").write_text("clip,label\nok.wav,a\nok.wav,b\nok.wav,a\n")
    data = load_task_data(task, 0, 0)
    assert data.train.modalities == ["audio"] and data.label_names == ["a", "b"]


def test_multimodal_row_with_a_blank_audio_cell_is_masked(tmp_path: Path) -> None:
    """text + audio per row; a blank audio cell is a missing recording: all its patches
    are masked (length 0), never zero-filled as if it were silence."""
    from bitblend.config.schema import TaskConfig
    from bitblend.data.sources import load_task_data

    sf.write(tmp_path / "a.wav", tone(440.0, 0.3, 16000), 16000)
    (tmp_path / "m.csv").write_text(
        "text,clip,label\nhello there,a.wav,x\nbye now,,y\nhello again,a.wav,x\nbye,a.wav,y\n"
    )
    task = TaskConfig(name="m", data=str(tmp_path / "m.csv"), modality="multimodal",
                      audio_column="clip", eval_fraction=0.25)  # fmt: skip
    data = load_task_data(task, 0, 0)
    assert data.train.modalities == ["text", "audio"]
    table, targets = (data.train, data.train_targets)
    if all(len(c) for c in table.audio):  # type: ignore[union-attr]
        table, targets = (data.eval, data.eval_targets)  # the blank row went to eval
    split = encode_split(table, "classification", targets, tokenizer=_tok(),
                         audio=(16000, 16000, 52))  # fmt: skip
    batch = collate(split, list(range(len(split))), 0, 1)
    lengths = batch["audio_len"].tolist()
    assert 0 in lengths and set(lengths) <= {0, 4800}
    model = _model(16000)
    _, mask = model.adapters["a"]["audio"](batch["audio"], batch["audio_len"])
    assert all(bool(m.sum() == 0) == (n == 0) for m, n in zip(mask, lengths, strict=True))


def _tok():  # type: ignore[no-untyped-def]
    from bitblend.models.backbones import load_backbone_with_head

    return load_backbone_with_head("tiny-bert", None, 0.0, 0.0, "torch")[1]


def test_cost_model_counts_the_audio_adapter_parameters() -> None:
    """estimate's head/adapter parameter count equals the built model's for an audio task."""
    from bitblend.estimate.shapes import head_params

    model = _model(16000)
    built = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
    width = model.backbone.config.hidden_size
    total, _, _ = head_params(list(model.specs.values()), width)
    assert total == built


@pytest.mark.parametrize("norm", ["clip", "band"])
def test_log_mel_norm_over_the_clip_frames_only(norm: str) -> None:
    """`clip` standardises a clip over all its frames and bands, `band` each mel band over
    the clip's frames (CMVN: a voice's spectral tilt drops out); padding changes nothing."""
    rng = np.random.default_rng(0)
    clip = tone(600.0, 0.5, 16000) + rng.normal(0, 0.05, 8000).astype(np.float32)
    wave = torch.zeros(2, 16000)
    wave[0, :8000] = torch.from_numpy(clip)
    wave[1, :8000] = torch.from_numpy(clip)
    wave[1, 8000:] = 5.0  # junk past the clip's end
    front = LogMel(16000, 32, norm)
    mel, frames = front(wave, torch.tensor([8000, 8000]))
    n = int(frames[0])
    assert n == 50 and torch.equal(mel[0], mel[1])
    assert mel[0, n:].abs().max() == 0  # frames of padding are zero
    valid = mel[0, :n].double()
    if norm == "band":
        assert float(valid.mean(0).abs().max()) < 1e-5  # every band: mean 0 ...
        assert float((valid.std(0, correction=0) - 1).abs().max()) < 5e-3  # ... and std 1
    else:
        assert abs(float(valid.mean())) < 1e-5 and abs(float(valid.std(correction=0)) - 1) < 1e-3
        assert float(valid.mean(0).std()) > 0.3  # the spectral shape (band means) is kept


def test_log_mel_band_norm_removes_a_fixed_spectral_tilt() -> None:
    """A voice through a fixed filter (here: a first-difference pre-emphasis, +/- 20 dB
    across the band) shifts each band's log energy by ~a constant: band norm gives nearly
    the same features, clip norm does not."""
    rng = np.random.default_rng(1)
    envelope = np.repeat(rng.uniform(0.2, 1.0, 20), 800)  # loudness changing every 50 ms
    clip = (rng.normal(0, 0.1, 16000) * envelope).astype(np.float32)
    tilted = np.append(clip[:1], clip[1:] - 0.95 * clip[:-1]).astype(np.float32)
    wave = torch.from_numpy(np.stack([clip, tilted]))
    lengths = torch.tensor([16000, 16000])
    band, _ = LogMel(16000, 32, "band")(wave, lengths)
    whole, _ = LogMel(16000, 32, "clip")(wave, lengths)
    moved = float((band[0] - band[1]).abs().mean())
    assert moved < 0.1 and float((whole[0] - whole[1]).abs().mean()) > 3 * moved


def test_audio_tokens_start_at_the_trunk_embedding_scale() -> None:
    """Projected patches pass a norm whose gain is the trunk's embedding RMS: unnormed they
    were ~20x larger than the trunk's own tokens and drowned the position embeddings."""
    model = _model(16000)
    embed = model.adapters["a"]["audio"]
    scale = embedding_rms(model.backbone)
    wave = torch.from_numpy(np.stack([tone(500, 1.0, 16000), tone(900, 1.0, 16000)]))
    with torch.no_grad():
        tokens, _ = embed(wave, torch.tensor([16000, 16000]))
        content = tokens - embed.position[: tokens.shape[1]]
    rms = float(content.square().mean().sqrt())
    assert abs(rms / scale - 1) < 0.05, (rms, scale)
