"""Inpainting for Z-Image-Turbo: img2img in which only the mask is repainted.

The same computation as diffusers' ZImageInpaintPipeline: the source latents are noised to the start σ of
the img2img schedule (strength), and after every Euler step the region to keep (mask 0) is put back to
the source noised to the next σ with the same noise (the clean source after the last step):
    x ← (1 − m)·(σ_next·ε + (1 − σ_next)·z0) + m·x
so where m = 0 the result is the source itself. m = 1 everywhere is plain img2img; m = 0 everywhere
returns the source without calling the model. Masks mean what they mean in ComfyUI and diffusers:
1 = repaint, 0 = keep.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from .samplers import Denoiser, StepCallback, _check_latents, model_placement, sample_euler
from .schedule import img2img_sigmas

__all__ = ["latent_inpaint_mask", "sample_inpaint"]


def latent_inpaint_mask(mask: Tensor, latent_size: Sequence[int], *, binarize: bool = True) -> Tensor:
    """A mask at pixel (or any) resolution → a (B, 1, h, w) float32 mask on the latent grid, 1 = repaint.

    As ZImageInpaintPipeline prepares it: values >= 0.5 become 1 and the rest 0 (`binarize`), then
    nearest-neighbour resampling to the latent size (h, w). `mask` is (H, W), (B, H, W) or (B, 1, H, W).
    With binarize=False a soft mask keeps its values (its edge then blends the two latents).
    """
    if not isinstance(mask, Tensor) or mask.ndim not in (2, 3, 4) or (mask.ndim == 4 and mask.shape[1] != 1):
        found = f"shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a tensor (H, W), (B, H, W) or (B, 1, H, W), got {found}.")
    size = tuple(int(s) for s in latent_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"latent_size must be (h, w) with h, w >= 1, got {latent_size!r}.")
    m = mask.detach().to(torch.float32).reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    if m.numel() == 0 or not bool(torch.isfinite(m).all()):
        raise ValueError("mask must be non-empty and finite (values 0..1, 1 = repaint).")
    if binarize:
        m = (m >= 0.5).to(torch.float32)
    else:
        m = m.clamp(0.0, 1.0)
    if tuple(m.shape[-2:]) != size:
        m = F.interpolate(m, size=size, mode="nearest")
    return m


def _check_mask(mask: object, latents: Tensor) -> Tensor:
    batch, _, h, w = latents.shape
    if (not isinstance(mask, Tensor) or mask.ndim != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != (h, w)
            or mask.shape[0] not in (1, batch)):
        found = f"shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"mask must be (1 or {batch}, 1, {h}, {w}), the latent grid, got {found}. Make it from a pixel mask "
            "with latent_inpaint_mask(mask, latents.shape[-2:])."
        )
    m = mask.detach().to(torch.float32)
    if not bool(torch.isfinite(m).all()) or bool((m < 0).any()) or bool((m > 1).any()):
        raise ValueError("mask values must be finite and between 0 and 1 (1 = repaint, 0 = keep).")
    return m


@torch.no_grad()
def sample_inpaint(
    model: Denoiser,
    positive: list[Tensor],
    source_latents: Tensor,
    noise: Tensor,
    mask: Tensor,
    *,
    strength: float = 1.0,
    steps: int = 8,
    shift: float = 3.0,
    guidance: float = 0.0,
    negative: list[Tensor] | None = None,
    callback: StepCallback | None = None,
    cfg_truncation: float | None = 1.0,
    cfg_normalization: float | bool = 0.0,
) -> Tensor:
    """Inpainting as diffusers' ZImageInpaintPipeline: repaint where `mask` is 1, keep the source where it is 0.

    `source_latents` (B or 1, 16, h, w) and `noise` (B, 16, h, w) are normalized latents; `mask` is
    (B or 1, 1, h, w) on the latent grid with values 0..1 (latent_inpaint_mask makes it from a pixel mask).
    The schedule is img2img's: strength 1 repaints the masked region from pure noise, lower strengths keep
    more of it. Returns float32 latents on the model's device; where the mask is 0 they equal the source.
    An all-zero mask, or a strength that leaves no step, returns the source without calling the model.
    """
    source_latents = _check_latents("source_latents", source_latents)
    noise = _check_latents("noise", noise)
    if source_latents.shape[1:] != noise.shape[1:] or source_latents.shape[0] not in (1, noise.shape[0]):
        raise ValueError(
            f"source_latents {tuple(source_latents.shape)} and noise {tuple(noise.shape)} must have the same shape "
            "(or the source a batch of 1)."
        )
    m = _check_mask(mask, noise)
    sig = img2img_sigmas(steps, strength, shift)
    device, _ = model_placement(model, noise.device)
    source = source_latents.to(device=device, dtype=torch.float32).expand(noise.shape[0], -1, -1, -1)
    if sig.numel() == 1 or not bool((m > 0).any()):
        return source.clone()  # nothing to repaint
    m = m.to(device)
    keep = 1 - m
    noise = noise.to(device=device, dtype=torch.float32)
    last = sig.numel() - 2

    def put_back_kept(i: int, x: Tensor) -> Tensor:
        # The kept region follows the source's own noising path (diffusers: scheduler.scale_noise with
        # the same noise at the next σ; the clean source after the last step).
        if i == last:
            proper = source
        else:
            sigma = sig[i + 1 : i + 2].to(device)
            proper = sigma * noise + (1.0 - sigma) * source
        return keep * proper + m * x

    sigma0 = sig[:1].to(device)
    x = sigma0 * noise + (1.0 - sigma0) * source
    return sample_euler(
        model,
        positive,
        x,
        sig,
        guidance=guidance,
        negative=negative,
        callback=callback,
        cfg_truncation=cfg_truncation,
        cfg_normalization=cfg_normalization,
        after_step=put_back_kept,
    )
