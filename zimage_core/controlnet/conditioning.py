"""The control latent a Fun ControlNet reads: control image, inpaint mask and masked image, encoded.

Layout (B, in_channels, h, w): 16 channels of the control image's latent; 2.x models add 1 mask channel
(1 = keep, 0 = repaint) and 16 channels of the masked image's latent. Two references fill them:

- "diffusers": `ZImageControlNetPipeline` (zeros for the 17 extra channels) and, with a mask,
  `ZImageControlNetInpaintPipeline` (mask binarized at 0.5; repainted pixels set to gray before encoding;
  mask channel = nearest-resized keep mask).
- "comfyui": ComfyUI's `ZImageFunControlnet`: without an inpaint image a gray one is encoded, without a mask
  the mask channel is 0; the mask is resized bilinearly and rounded for the pixels, nearest for the channel.
- "videox": alibaba-pai VideoX-Fun's `ZImageControlPipeline` (as its examples call it: a gray inpaint image and
  an all-repaint mask when none is given, so mask channel 0 and a gray image's latent, as "comfyui"; a mask is
  binarized and resized as "diffusers").

Images are (B, H, W, 3) in [0, 1] (ComfyUI's IMAGE); `encode` maps such pixels to the model's (scaled)
latents. Both references use a gray image's latent where a control image is missing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .model import LATENT_CHANNELS

STYLES = ("diffusers", "comfyui", "videox")
Encode = Callable[[torch.Tensor], torch.Tensor]


def fit_image(image: torch.Tensor, height: int, width: int, mode: str = "area") -> torch.Tensor:
    """Resize (B, H, W, C) to height × width, center-cropping to the new aspect first (as ComfyUI's
    common_upscale(..., "center") does), so a control image of another size lines up with the latent."""
    if image.shape[1] == height and image.shape[2] == width:
        return image
    x = image.movedim(-1, 1)
    old_h, old_w = x.shape[-2:]
    old_aspect, new_aspect = old_w / old_h, width / height
    dx = dy = 0
    if old_aspect > new_aspect:
        dx = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        dy = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    x = x.narrow(-2, dy, old_h - 2 * dy).narrow(-1, dx, old_w - 2 * dx)
    return F.interpolate(x, size=(height, width), mode=mode).movedim(1, -1)


def _mask(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) / (B, H, W) / (B, 1, H, W) → (B, 1, H, W) float; NaN/inf refused (a NaN compares false, so it would
    silently mean "keep everything")."""
    m = mask.float()
    if not bool(torch.isfinite(m).all()):
        raise ValueError("control_latents: the mask has NaN/inf values; a mask holds 0..1 (1 = repaint).")
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 3:
        m = m[:, None]
    return m.mean(1, keepdim=True) if m.shape[1] != 1 else m


def control_latents(encode: Encode, in_channels: int, *, control_image: torch.Tensor | None,
                    inpaint_image: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                    style: str = "diffusers") -> torch.Tensor:
    """The (B, in_channels, h, w) control latent for a model taking `in_channels` (16 or 33).

    mask: 1 = repaint (ComfyUI's MASK convention), any of (H, W), (B, H, W), (B, 1, H, W), same pixel
    size as the images. Images must already have the latent's pixel size (see `fit_image`).
    """
    if style not in STYLES:
        raise ValueError(f"control_latents: style must be one of {STYLES}, got {style!r}.")
    images = [t for t in (control_image, inpaint_image) if t is not None]
    if not images:
        raise ValueError("control_latents: give a control image, an inpaint image, or both.")
    like = images[0][..., :3]
    gray = torch.full_like(like, 0.5)
    control = encode(control_image[..., :3] if control_image is not None else gray)
    if in_channels == LATENT_CHANNELS:
        return control
    if in_channels != 2 * LATENT_CHANNELS + 1:
        raise ValueError(f"control_latents: a Fun ControlNet takes 16 or 33 channels, not {in_channels}.")
    b, _, h, w = control.shape
    if style == "diffusers" and mask is None and inpaint_image is None:
        # ZImageControlNetPipeline: no inpainting, the extra channels are zero.
        return torch.cat([control, control.new_zeros(b, in_channels - LATENT_CHANNELS, h, w)], 1)
    source = inpaint_image[..., :3] if inpaint_image is not None else gray
    if mask is None:
        keep_px = None
        channel = control.new_zeros(b, 1, h, w)
    elif style in ("diffusers", "videox"):
        # VaeImageProcessor binarizes the mask (both pipelines); VideoX-Fun's ZImageControlPipeline without an
        # inpaint image gets a gray one from its examples, as the comfyui style does, not diffusers' zeros.
        m = (_mask(mask).to(source.device) >= 0.5).float()
        m = fit_image(m.movedim(1, -1), source.shape[1], source.shape[2], "nearest").movedim(-1, 1)
        keep_px = (m < 0.5).float()
        channel = F.interpolate(1 - m, size=(h, w), mode="nearest")
    else:
        keep = 1 - _mask(mask).to(source.device)
        keep_px = fit_image(keep.movedim(1, -1), source.shape[1], source.shape[2], "bilinear").movedim(-1, 1).round()
        channel = fit_image(keep.movedim(1, -1), h, w, "nearest").movedim(-1, 1)
    if keep_px is not None:
        source = (source - 0.5) * keep_px.movedim(1, -1) + 0.5  # repainted pixels → gray
    masked = encode(source)
    n = max(control.shape[0], masked.shape[0], channel.shape[0])

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t if t.shape[0] == n else t.expand(n, *t.shape[1:])

    return torch.cat([rows(control), rows(channel.to(control)), rows(masked.to(control))], 1)
