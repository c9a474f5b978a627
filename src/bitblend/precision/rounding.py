"""Writing fp32 results into bf16 storage: round to nearest, stochastic rounding, Kahan.

Pure bf16 training (bf16-true without an fp32 master copy) loses every update smaller than
half a weight's ulp under round-to-nearest: a LayerNorm gain of 1.0 has an ulp of 2^-7, so
lr x update below ~0.004 never moves it. Two cures, both keeping 2 bytes/param of weights:

- stochastic rounding: round up with probability equal to the distance to the lower
  neighbour, so the expected stored value equals the fp32 value and small updates add up.
- Kahan compensation: keep a second bf16 tensor holding what rounding dropped; the next
  step adds it back. weight + compensation carries ~16 significant bits.
"""

from __future__ import annotations

import torch

_LOW_BITS = 0xFFFF  # the 16 fp32 mantissa bits that bf16 drops


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, gen: torch.Generator) -> None:
    """Write fp32 `src` into bf16 `dst`, rounding up with probability = dropped fraction.

    Adding a uniform random integer in [0, 2^16) to the fp32 bit pattern and truncating the
    low 16 bits rounds up exactly when the random number exceeds the complement of the
    dropped bits: P(up) = dropped / 2^16. Non-finite values are rounded to nearest.
    """
    src = src.detach().float().contiguous()
    bits = src.view(torch.int32)
    noise = torch.randint(
        0, _LOW_BITS + 1, src.shape, dtype=torch.int32, device=src.device, generator=gen
    )
    rounded = ((bits + noise) & ~_LOW_BITS).view(torch.float32)
    # An add that carries into the exponent of the largest finite values would give inf;
    # non-finite inputs keep their value. Both are rare and rounded to nearest instead.
    ok = torch.isfinite(rounded) & torch.isfinite(src)
    dst.copy_(torch.where(ok, rounded, src))


def kahan_round_(dst: torch.Tensor, comp: torch.Tensor, src: torch.Tensor) -> None:
    """Write fp32 `src` into bf16 `dst` and what rounding dropped into bf16 `comp`."""
    src = src.detach().float()
    dst.copy_(src)
    comp.copy_(src - dst.float())


def widen(weight: torch.Tensor, comp: torch.Tensor | None) -> torch.Tensor:
    """The fp32 value a bf16 weight (plus its Kahan compensation) stands for."""
    out = weight.detach().float()
    return out if comp is None else out + comp.float()


def narrow_(dst: torch.Tensor, src: torch.Tensor, gen: torch.Generator | None) -> None:
    """Write fp32 `src` into low-precision `dst`: stochastically with a generator, else RN."""
    if gen is None:
        dst.copy_(src)
    else:
        stochastic_round_(dst, src, gen)
