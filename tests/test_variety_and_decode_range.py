"""zimage_core's seed-variety math and the VAE decode range check, without ComfyUI."""

from __future__ import annotations

import math

import pytest
import torch

from zimage_core.sampling import SeedVariety, caption_noise, flow_sigmas, noise_seed, step_of, vary_caption
from zimage_core.vae import DECODE_BOUND, LATENT_SCALE, LATENT_SHIFT, limit_decode_latents


def test_vary_caption_follows_its_formula_and_zero_is_the_same_object():
    torch.manual_seed(0)
    feats = torch.randn(7, 64) * torch.linspace(0.1, 50, 7)[:, None]  # tokens of very different size
    noise = caption_noise(123, 0, (7, 64))
    assert vary_caption(feats, noise, 0.0) is feats
    out = vary_caption(feats, noise, 0.4)
    rms = torch.sqrt((feats.double() ** 2).mean(-1, keepdim=True))
    expected = feats.double() + 0.4 * rms * noise.double()
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)  # float32 arithmetic
    bf16 = vary_caption(feats.bfloat16(), noise, 0.4)
    assert bf16.dtype == torch.bfloat16


def test_caption_noise_is_seeded_per_image_and_standard_normal():
    a = caption_noise(5, 0, (64, 256))
    assert torch.equal(a, caption_noise(5, 0, (64, 256)))
    assert not torch.equal(a, caption_noise(5, 1, (64, 256)))
    assert not torch.equal(a, caption_noise(6, 0, (64, 256)))
    assert abs(a.mean().item()) < 0.02 and abs(a.std().item() - 1) < 0.02
    # Not the stream ComfyUI draws the latent noise from (torch.manual_seed(seed)).
    assert not torch.equal(a.flatten()[:16], torch.randn(16, generator=torch.Generator().manual_seed(5)))
    assert 0 <= noise_seed(2**64 - 1, 7) < 2**64


def test_steps_and_cutoff():
    sigmas = flow_sigmas(8, 3.0)
    assert [step_of(float(s), sigmas) for s in sigmas[:-1]] == list(range(8))
    v = SeedVariety(0.5, 0.25)
    assert [v.applies_to_step(i, 8) for i in range(8)] == [True, True] + [False] * 6
    assert not any(SeedVariety(0.0, 1.0).applies_to_step(i, 8) for i in range(8))
    assert not any(SeedVariety(1.0, 0.0).applies_to_step(i, 8) for i in range(8))
    for bad in [(-0.1, 0.25), (math.inf, 0.25), (0.5, 1.01), (0.5, math.nan)]:
        with pytest.raises(ValueError):
            SeedVariety(*bad)


def test_decode_range_check():
    torch.manual_seed(1)
    healthy = torch.randn(2, 16, 8, 8) * 3 / LATENT_SCALE + LATENT_SHIFT  # normalised std 3: still healthy
    same, report = limit_decode_latents(healthy)
    assert same is healthy and report is None
    wild = healthy.clone()
    wild[0, 0, 0, 0] = 1e30
    wild[1, 2, 3, 4] = float("nan")
    fixed, report = limit_decode_latents(wild)
    assert report.non_finite == 1 and report.out_of_range == 1 and report.total == wild.numel()
    z = (fixed - LATENT_SHIFT) * LATENT_SCALE
    assert torch.isfinite(fixed).all() and z.abs().max() <= DECODE_BOUND + 1e-4
    assert math.isclose(float(z[0, 0, 0, 0]), DECODE_BOUND, rel_tol=1e-5)
    assert math.isclose(float(fixed[1, 2, 3, 4]), LATENT_SHIFT, rel_tol=1e-6)
    untouched = torch.ones_like(wild, dtype=torch.bool)
    untouched[0, 0, 0, 0] = untouched[1, 2, 3, 4] = False
    assert torch.equal(fixed[untouched], wild[untouched])
    assert "1 NaN/inf" in report.describe() and "clamped" in report.describe()
