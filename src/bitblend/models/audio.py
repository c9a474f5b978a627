"""Audio into the trunk: batched log-mel spectrograms on the model's device, cut into
time x frequency patches, embedded like image patches (linear projection + a learned
position per patch).

The log-mel front end has no trainable weights and runs inside the forward, so features
are computed for a whole batch at once on the training device (torch.stft + one matmul
with the mel filterbank), never per example in Python, and `predict` / `serve` get the
very same features from raw waveforms. It is listed among the model's fp32 modules
(precision/rules.py), so it computes in fp32 with autocast off under every recipe: the
power spectrum spans ~10 decades, which bf16's 8 mantissa bits would round to steps.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

WINDOW_S = 0.025  # analysis window: 25 ms
HOP_S = 0.010  # frame step: 10 ms
NORMS = ("clip", "band")  # LogMel standardisation: per clip, or per clip and mel band


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """HTK mel scale."""
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    """Inverse of `hz_to_mel`."""
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """(n_freqs, n_mels) triangular filters, mel-spaced from 0 Hz to Nyquist (HTK)."""
    freqs = torch.linspace(0.0, sample_rate / 2, n_freqs, dtype=torch.float64)
    edges = mel_to_hz(
        torch.linspace(0.0, float(hz_to_mel(torch.tensor(sample_rate / 2.0))), n_mels + 2)
    ).to(torch.float64)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]  # (n_mels,) each
    f = freqs.unsqueeze(1)  # (n_freqs, 1)
    rising = (f - lower) / (centre - lower)
    falling = (upper - f) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


class LogMel(nn.Module):
    """Waveforms -> per-clip standardised log-mel spectrograms, batched.

    (batch, samples) + lengths (batch,) -> (batch, frames, n_mels) and the number of
    frames of each clip that hold signal (batch,). Samples past a clip's length are zeroed
    first, so whatever padding a batch carries, a clip's features are the same.
    `norm`: "clip" standardises each clip over all its frames and bands at once (gain drops
    out); "band" standardises each mel band of a clip over its frames (per-utterance
    cepstral mean and variance normalisation: a voice's or channel's spectral tilt drops
    out too, which a classifier of held-out voices must ignore).
    """

    def __init__(self, sample_rate: int, n_mels: int, norm: str = "clip") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm: expected one of {', '.join(NORMS)}, got {norm!r}")
        self.sample_rate = sample_rate
        self.n_mels = n_mels
        self.norm = norm
        self.win = max(8, round(WINDOW_S * sample_rate))
        self.hop = max(1, round(HOP_S * sample_rate))
        self.n_fft = 1 << (self.win - 1).bit_length()  # next power of two >= the window
        # Plain attributes, not buffers: a precision recipe's model.to(bf16) must not
        # round the filterbank, and nothing here needs saving (it follows from the spec).
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.seconds = 0.0  # wall time spent here since the trainer last read it

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The Hann window (win,) and mel filterbank (n_fft/2+1, n_mels) on `device`."""
        if device not in self._tables:
            window = torch.hann_window(self.win, periodic=True)
            bank = mel_filterbank(self.n_fft // 2 + 1, self.n_mels, self.sample_rate)
            self._tables[device] = (window.to(device), bank.to(device))
        return self._tables[device]

    def valid_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames (centred, one per hop) whose centre lies inside the clip: (batch,)."""
        return torch.where(lengths > 0, (lengths - 1) // self.hop + 1, torch.zeros_like(lengths))

    def forward(
        self, wave: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, samples), (batch,) -> (batch, frames, n_mels), valid frames (batch,)."""
        start = time.perf_counter()
        window, bank = self.tables(wave.device)
        pos = torch.arange(wave.shape[1], device=wave.device)
        wave = wave.float() * (pos.unsqueeze(0) < lengths.unsqueeze(1))  # padding -> 0
        # center=True pads by reflection at both ends; the end of a padded clip reflects
        # zeros, so its frames do not depend on how much padding follows.
        spec = torch.stft(
            wave, self.n_fft, self.hop, self.win, window, center=True, return_complex=True
        )  # (batch, n_fft/2+1, frames)
        power = spec.real.square() + spec.imag.square()
        mel = torch.log(power.transpose(1, 2) @ bank + 1e-6)  # (batch, frames, n_mels)
        frames = self.valid_frames(lengths)
        valid = (torch.arange(mel.shape[1], device=mel.device) < frames.unsqueeze(1)).unsqueeze(2)
        # Standardise each clip over its own frames only (loudness and gain drop out):
        # over frames and bands ("clip") or over frames, band by band ("band").
        dims = (1, 2) if self.norm == "clip" else (1,)
        per = self.n_mels if self.norm == "clip" else 1
        count = (frames.clamp(min=1) * per).to(mel.dtype).view(-1, 1, 1)
        mean = (mel * valid).sum(dim=dims, keepdim=True) / count
        var = ((mel - mean).square() * valid).sum(dim=dims, keepdim=True) / count
        out = ((mel - mean) / torch.sqrt(var + 1e-5)) * valid
        if out.device.type == "cuda":  # honest timing of asynchronous kernels
            torch.cuda.synchronize(out.device)
        self.seconds += time.perf_counter() - start
        return out, frames


def spec_augment(features: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """SpecAugment (Park et al. 2019) on standardised log-mels (batch, frames, mels): two
    time masks of up to 10% of each clip's frames and two frequency masks of up to
    mels / 8 bands, set to 0 (the clip mean). Draws from torch's global RNG, whose state
    the checkpoint saves, so a resumed run masks the same way."""
    b, t, m = features.shape
    dev = features.device
    out = features
    tpos = torch.arange(t, device=dev).view(1, t, 1)
    mpos = torch.arange(m, device=dev).view(1, 1, m)
    for _ in range(2):
        width = (torch.rand(b, device=dev) * 0.1 * frames.clamp(min=1)).long()
        start = (torch.rand(b, device=dev) * (frames - width).clamp(min=1)).long()
        hit = (tpos >= start.view(b, 1, 1)) & (tpos < (start + width).view(b, 1, 1))
        out = out.masked_fill(hit, 0.0)
    for _ in range(2):
        width = (torch.rand(b, device=dev) * max(1, m // 8)).long()
        start = (torch.rand(b, device=dev) * (m - width)).long()
        hit = (mpos >= start.view(b, 1, 1)) & (mpos < (start + width).view(b, 1, 1))
        out = out.masked_fill(hit, 0.0)
    return out


def audio_patch_grid(
    num_samples: int, sample_rate: int, n_mels: int, patch_frames: int, patch_mels: int
) -> tuple[int, int]:
    """(time patches, frequency patches) of a clip of `num_samples` samples."""
    hop = max(1, round(HOP_S * sample_rate))
    frames = num_samples // hop + 1  # centred frames
    return max(1, math.ceil(frames / patch_frames)), n_mels // patch_mels


class AudioEmbedding(nn.Module):
    """Waveforms -> patch tokens and their mask: (B, S), (B,) -> (B, P, H), (B, P).

    Patches are `patch_frames` x `patch_mels`, time-major (all bands of the first frames
    first); a patch is masked when its first frame lies past the clip's signal, so a clip
    padded to any length gives the trunk the same unmasked tokens.

    The projected patches pass a LayerNorm whose gain starts at `token_scale` (the RMS of
    the trunk's word embeddings): a plain projection of standardised log-mels makes
    tokens ~20x the size of the trunk's own embeddings, so the position embeddings added
    to them (the patch table here, the trunk's own) vanish in the trunk's embedding
    LayerNorm and the trunk starts from a bag of patches that does not know time order.
    """

    def __init__(
        self,
        sample_rate: int,
        num_samples: int,
        n_mels: int,
        patch_frames: int,
        patch_mels: int,
        width: int,
        augment: bool = False,
        norm: str = "clip",
        token_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.frontend = LogMel(sample_rate, n_mels, norm)
        self.patch_frames, self.patch_mels = patch_frames, patch_mels
        self.augment = augment
        t, f = audio_patch_grid(num_samples, sample_rate, n_mels, patch_frames, patch_mels)
        self.proj = nn.Linear(patch_frames * patch_mels, width)
        self.token_norm = nn.LayerNorm(width)
        nn.init.constant_(self.token_norm.weight, token_scale)
        self.position = nn.Parameter(torch.randn(t * f, width) * 0.02)

    def forward(
        self, wave: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, samples), (batch,) -> tokens (batch, patches, width), mask (batch, patches)."""
        mel, frames = self.frontend(wave, lengths)  # (B, T, M) fp32
        if self.training and self.augment:
            mel = spec_augment(mel, frames)
        b, t, m = mel.shape
        pt, pm = self.patch_frames, self.patch_mels
        nt = -(-t // pt)
        mel = nn.functional.pad(mel, (0, 0, 0, nt * pt - t))  # whole time patches
        nf = m // pm
        x = mel[:, :, : nf * pm].reshape(b, nt, pt, nf, pm).permute(0, 1, 3, 2, 4)
        x = x.reshape(b, nt * nf, pt * pm)  # (B, P, pt*pm), time-major
        starts = torch.arange(nt, device=wave.device) * pt  # first frame of each time patch
        present = (starts.unsqueeze(0) < frames.unsqueeze(1)).repeat_interleave(nf, dim=1)
        tokens = self.token_norm(self.proj(x.to(self.proj.weight.dtype)))
        tokens = tokens + self.position[: nt * nf].to(tokens.dtype)
        return tokens, present.long()
