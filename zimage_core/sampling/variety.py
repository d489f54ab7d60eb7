"""Seed variety: seed-dependent noise on the caption features during the first sampling steps.

Z-Image-Turbo is distilled to land on nearly the same composition for a prompt whatever the starting
noise (Tongyi-MAI/Z-Image #16, #27): the layout is decided in the first, high-noise steps and the
caption pins it down. Perturbing the caption features there, with noise drawn from the seed, lets each
seed start from a slightly different reading of the prompt; the later steps see the exact caption, so
the image still follows the prompt and detail is unaffected.

For caption token features f (one row per token) and standard normal noise e drawn from the seed:

    f' = f + strength * rms(f) * e        on steps i with i < end * steps (0-based), else f' = f

rms(f) is each token's root mean square, so the noise has the same relative size on every token (the
transformer's caption embedder RMS-normalises each token first, and Qwen3 features have a few huge
outlier channels that a global scale would let dominate). strength 0 (or end 0) returns the features
object itself, so the result is bit-identical to not using the technique.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Mixes the seed with the image index so the caption noise is not the same random stream as the
# starting latent noise (ComfyUI seeds that with the plain seed) and differs between batch images.
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SeedVariety:
    """strength: noise size relative to each token's RMS (0 = off; 0.1–0.5 is a useful range).
    end: fraction of the steps, from the first, whose caption is perturbed (0.25 = 2 of 8)."""

    strength: float = 0.0
    end: float = 0.25

    def __post_init__(self) -> None:
        if not (math.isfinite(self.strength) and self.strength >= 0):
            raise ValueError(f"seed variety strength must be a finite number >= 0, got {self.strength!r}.")
        if not (math.isfinite(self.end) and 0.0 <= self.end <= 1.0):
            raise ValueError(f"seed variety end must be between 0 and 1 (a fraction of the steps), got {self.end!r}.")

    @property
    def enabled(self) -> bool:
        return self.strength > 0 and self.end > 0

    def applies_to_step(self, step: int, total: int) -> bool:
        """Whether 0-based step `step` of `total` gets perturbed captions."""
        return self.enabled and step < self.end * total


def noise_seed(seed: int, image_index: int) -> int:
    """The generator seed of image `image_index`'s caption noise for sampler seed `seed` (64-bit)."""
    return ((int(seed) & _MASK64) * _GOLDEN + int(image_index) + 1) & _MASK64


def caption_noise(seed: int, image_index: int, shape: tuple[int, ...]) -> Tensor:
    """Standard normal float32 noise of `shape` for one image, drawn on the CPU (the same on any device)."""
    generator = torch.Generator(device="cpu").manual_seed(noise_seed(seed, image_index))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def vary_caption(features: Tensor, noise: Tensor, strength: float) -> Tensor:
    """features + strength * rms(token) * noise, in float32, returned in the features' dtype.

    `features` (..., tokens, dim); `noise` broadcastable to it. strength 0 returns `features` itself.
    """
    if strength == 0:
        return features
    f = features.float()
    rms = f.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return (f + float(strength) * rms * noise.to(device=f.device, dtype=torch.float32)).to(features.dtype)
