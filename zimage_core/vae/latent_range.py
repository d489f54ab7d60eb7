"""A range check for latents entering the VAE decoder.

The FLUX.1 autoencoder's latents are normalised for the transformer as (raw − 0.1159) · 0.3611: the
shift is the latents' mean and 0.3611 ≈ 1/their standard deviation over the autoencoder's training
images, so normalised latents of real images have unit variance. The flow sampler starts from standard
normal noise and moves it toward such latents; a working sampler therefore produces values of a few
units (|z| > 5 is already rare: the 1e-6 tail of a unit Gaussian is 4.9). DECODE_BOUND = 12 normalised
units (raw 0.1159 ± 33.2) is more than twice that tail, so no healthy latent is touched, while a
diverging run (overflowing activations, a broken LoRA) gives values of hundreds to 1e30. Such values
wreck the decoder in a way clamping limits: its first GroupNorm takes mean and variance over whole
channel groups, so a handful of huge values flattens every other pixel of the group to the same
colour (the black or grey images users report). NaN/inf carry no information and become the mean (0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..constants import LATENT_SCALE, LATENT_SHIFT

DECODE_BOUND = 12.0


@dataclass(frozen=True)
class LatentRangeReport:
    """What limit_decode_latents changed: counts of values and the largest |normalised value| found."""

    non_finite: int
    out_of_range: int
    total: int
    max_abs: float

    def describe(self) -> str:
        parts = []
        if self.non_finite:
            parts.append(f"{self.non_finite} NaN/inf value(s) set to the latent mean")
        if self.out_of_range:
            parts.append(f"{self.out_of_range} value(s) beyond ±{DECODE_BOUND:g} (normalised; largest "
                         f"{self.max_abs:.3g}) clamped")
        return (f"{' and '.join(parts)} out of {self.total}. The latent did not come from a healthy sampling "
                "run (fp16 overflow, a broken LoRA or an unsuitable latent); the image may still be degraded.")


def limit_decode_latents(raw: Tensor, bound: float = DECODE_BOUND) -> tuple[Tensor, LatentRangeReport | None]:
    """Raw FLUX latents (ComfyUI's LATENT) made safe to decode: NaN/inf → the mean, normalised values
    clamped to ±bound. Returns (latents, None) with the very same tensor when nothing is wrong."""
    z = (raw.detach().float() - LATENT_SHIFT) * LATENT_SCALE
    finite = torch.isfinite(z)
    non_finite = int((~finite).sum())
    magnitude = torch.where(finite, z.abs(), torch.zeros_like(z))
    out_of_range = int((magnitude > bound).sum())
    if non_finite == 0 and out_of_range == 0:
        return raw, None
    max_abs = float(magnitude.max()) if magnitude.numel() else 0.0
    limited = torch.nan_to_num(z, nan=0.0, posinf=bound, neginf=-bound).clamp(-bound, bound)
    limited = (limited / LATENT_SCALE + LATENT_SHIFT).to(dtype=raw.dtype)
    # Only the bad values are replaced: the others keep their exact bits.
    fixed = torch.where((~finite) | (magnitude > bound), limited, raw.detach())
    return fixed, LatentRangeReport(non_finite, out_of_range, z.numel(), max_abs)
