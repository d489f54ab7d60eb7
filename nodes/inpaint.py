"""Inpainting masks and the composite back onto the source, for the Z-Image samplers.

Pixel-space bookkeeping only (no model math): fitting a MASK to an image or latent, growing and feathering
its edge, and pasting the decoded result back so that every pixel the mask does not touch is the source's
own. Masks follow ComfyUI's convention: 1 = repaint, 0 = keep (LoadImage gives 1 where the painted alpha
is 0, i.e. where the mask editor painted).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import comfy.model_management as mm
import torch
from torch.nn import functional as F

from .errors import check_widgets
from .latent import crop_box

NODE_CATEGORY = "Z-Image/inpaint"
MAX_EDGE = 256  # grow/feather in pixels
log = logging.getLogger("ComfyUI-ZImage")


def mask_batch(mask: torch.Tensor, node: str, name: str = "mask") -> torch.Tensor:
    """A core MASK as float32 (B, H, W) with values 0..1; (H, W) and (B, 1, H, W) are accepted too."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3, 4) or (mask.ndim == 4 and mask.shape[1] != 1):
        found = f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{node}: {name} must be a MASK (batch, height, width), got {found}.")
    # On the CPU: small, and its convolutions are exact there (a GPU FFT convolution could leave tiny
    # nonzero values far from the mask, which the composite would then blend).
    m = mask.detach().to(device="cpu", dtype=torch.float32).reshape(-1, mask.shape[-2], mask.shape[-1])
    if m.numel() == 0:
        raise ValueError(f"{node}: {name} is empty ({tuple(mask.shape)}).")
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"{node}: {name} has NaN/inf values; a mask holds 0..1 (1 = repaint).")
    return m.clamp(0.0, 1.0)


def fit_mask(mask: torch.Tensor, height: int, width: int, node: str, target: str) -> torch.Tensor:
    """`mask` (B, H, W) made (B, height, width).

    A mask of the source image's size whose centre crop to multiples of 16 is (height, width) is cropped
    as ZImageVAEEncode crops the image; any other size is resized (bilinear) with a note in the log.
    """
    mh, mw = mask.shape[-2:]
    if (mh, mw) == (height, width):
        return mask
    top, left, ch, cw = crop_box(mh, mw)
    if (ch, cw) == (height, width):
        return mask[:, top:top + height, left:left + width]
    log.warning("%s: the mask is %dx%d but the %s is %dx%d; the mask was resized (bilinear) to fit. Paint the "
                "mask on the same image (LoadImage's mask editor) to avoid this.", node, mw, mh, target, width, height)
    return F.interpolate(mask[:, None], size=(height, width), mode="bilinear")[:, 0]


def warn_if_empty(mask: torch.Tensor, node: str) -> bool:
    """True (with a note) when nothing is to be repainted."""
    if bool((mask > 0).any()):
        return False
    log.warning("%s: the mask is empty (all 0), so nothing is repainted and the source comes back unchanged. "
                "Paint the area to repaint: right-click LoadImage → Open in MaskEditor.", node)
    return True


# Grow and feather work on chunks of rows, then of columns, written back in place: a temporary is about
# this many float32 values (512 KB) plus the window's margin, so a mask costs about one copy of itself
# however large it and the window are (a whole-image pad + pool/convolution held several full copies).
# Small enough that the allocator reuses the chunks' memory instead of growing (larger chunks are ~1.3x faster).
CHUNK_ELEMENTS = 1 << 17


def _in_chunks(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], halo: int, dim: int,
               check: Callable[[], None] | None) -> None:
    """x (B, H, W) ← fn(chunk) along `dim` (-1: rows, -2: columns), each chunk replicate-padded by `halo` on
    that axis (fn shortens it by 2·halo again). `check()` runs before every chunk (Cancel)."""
    _, h, w = x.shape
    length, across = (w, h) if dim == -1 else (h, w)
    step = max(1, CHUNK_ELEMENTS // (length + 2 * halo))
    pad = (halo, halo, 0, 0) if dim == -1 else (0, 0, halo, halo)
    for image in x:
        for start in range(0, across, step):
            if check is not None:
                check()
            part = image[start:start + step] if dim == -1 else image[:, start:start + step]
            result = fn(F.pad(part[None, None], pad, mode="replicate"))[0, 0]
            part.copy_(result)


def grow_mask_(mask: torch.Tensor, pixels: int, check: Callable[[], None] | None = None) -> torch.Tensor:
    """In place: dilate (pixels > 0) or erode (pixels < 0) by |pixels| with a square window; (B, H, W)."""
    if pixels == 0:
        return mask
    r = abs(pixels)
    if pixels < 0:
        mask.neg_()  # erosion = −dilation(−mask)
    # A square window is separable: a row pass then a column pass (O(k) per pixel, not O(k²)).
    _in_chunks(mask, lambda c: F.max_pool2d(c, kernel_size=(1, 2 * r + 1), stride=1), r, -1, check)
    _in_chunks(mask, lambda c: F.max_pool2d(c, kernel_size=(2 * r + 1, 1), stride=1), r, -2, check)
    if pixels < 0:
        mask.neg_()
    return mask


def feather_mask_(mask: torch.Tensor, pixels: int, check: Callable[[], None] | None = None) -> torch.Tensor:
    """In place: soften the edge over ±pixels: a separable Gaussian (σ = pixels/2) cut off at `pixels`.

    The cut-off is exact: a pixel farther than `pixels` from every nonzero pixel stays exactly 0, so
    the composite leaves it untouched.
    """
    if pixels <= 0:
        return mask
    t = torch.arange(-pixels, pixels + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / (pixels / 2)) ** 2)
    k = k / k.sum()
    _in_chunks(mask, lambda c: F.conv2d(c, k.view(1, 1, 1, -1)), pixels, -1, check)
    _in_chunks(mask, lambda c: F.conv2d(c, k.view(1, 1, -1, 1)), pixels, -2, check)
    return mask.clamp_(0.0, 1.0)


def grow_mask(mask: torch.Tensor, pixels: int, check: Callable[[], None] | None = None) -> torch.Tensor:
    """`grow_mask_` on a copy (the given mask is unchanged)."""
    return grow_mask_(mask.clone(), pixels, check) if pixels else mask


def feather_mask(mask: torch.Tensor, pixels: int, check: Callable[[], None] | None = None) -> torch.Tensor:
    """`feather_mask_` on a copy (the given mask is unchanged)."""
    return feather_mask_(mask.clone(), pixels, check) if pixels > 0 else mask


def latent_with_mask(latent: dict, mask: torch.Tensor | None, node: str) -> dict:
    """The LATENT with `mask` as its noise_mask (fitted to the latent's pixel size); unchanged without one."""
    if mask is None:
        return latent
    h, w = latent["samples"].shape[-2:]
    m = fit_mask(mask_batch(mask, node), h * 8, w * 8, node, "latent's image")
    # As SetLatentNoiseMask stores it; KSampler resizes it to the latent grid (bilinear).
    return {**latent, "noise_mask": m.reshape(-1, 1, h * 8, w * 8)}


def nothing_to_repaint(latent: dict, node: str) -> bool:
    noise_mask = latent.get("noise_mask")
    return noise_mask is not None and warn_if_empty(noise_mask, node)


class ZImageInpaintMask:
    DESCRIPTION = ("Prepares an inpainting mask (1 = repaint): grows its edge and feathers it, and fits it to the "
                   "image (a mask of another size is resized, with a note in the log). Connect the same output to "
                   "the sampler's mask and to ZImageInpaintComposite.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("MASK",)
    OUTPUT_TOOLTIPS = ("The prepared mask (1 = repaint, soft at the feathered edge).",)
    FUNCTION = "prepare"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mask": ("MASK", {"tooltip": "Where to repaint, 1 = repaint: LoadImage's MASK output (paint it with "
                                             "right-click → Open in MaskEditor), or any MASK."}),
                "grow": ("INT", {"default": 8, "min": -MAX_EDGE, "max": MAX_EDGE, "step": 1,
                                 "tooltip": "Pixels to grow the mask by (negative shrinks it) before feathering, so "
                                            "the repainted area covers the painted one with some margin."}),
                "feather": ("INT", {"default": 8, "min": 0, "max": MAX_EDGE, "step": 1,
                                    "tooltip": "Width in pixels of the soft edge on each side of the grown mask. "
                                               "Pixels farther than grow + feather from the painted area are "
                                               "never changed. Keep grow >= feather so the painted area is fully "
                                               "repainted."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "The image the mask belongs to (LoadImage's IMAGE): the mask is "
                                               "fitted to its size."}),
            },
        }

    def prepare(self, mask, grow: int, feather: int, image=None):
        node = "ZImageInpaintMask"
        check_widgets(type(self), grow=grow, feather=feather)  # a linked value skips ComfyUI's min/max
        m = mask_batch(mask, node)  # a new float32 tensor: grown and feathered in place
        if image is not None:
            m = fit_mask(m, image.shape[1], image.shape[2], node, "image")
        warn_if_empty(m, node)
        check = mm.throw_exception_if_processing_interrupted  # Cancel between chunks
        return (feather_mask_(grow_mask_(m, grow, check), feather, check),)


class ZImageInpaintComposite:
    DESCRIPTION = ("Pastes the inpainted image back onto the source through the mask: where the mask is 0 every "
                   "pixel is the source's own, bit for bit; where it is 1 the generated image; a feathered edge "
                   "blends the two. A result centre-cropped to multiples of 16 by ZImageVAEEncode is put back in "
                   "its place, so the output has the source's size.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The source with the masked area replaced by the generated image.",)
    FUNCTION = "composite"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "source": ("IMAGE", {"tooltip": "The original image (LoadImage's IMAGE)."}),
            "generated": ("IMAGE", {"tooltip": "The decoded sampler result (ZImageVAEDecode)."}),
            "mask": ("MASK", {"tooltip": "The mask used for sampling (ZImageInpaintMask's output), 1 = take the "
                                         "generated pixel."}),
        }}

    def composite(self, source, generated, mask):
        node = "ZImageInpaintComposite"
        for name, image in (("source", source), ("generated", generated)):
            if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
                raise ValueError(f"{node}: {name} must be an IMAGE (batch, height, width, channels).")
        batch = max(source.shape[0], generated.shape[0])
        for name, n in (("source", source.shape[0]), ("generated", generated.shape[0])):
            if n not in (1, batch):
                raise ValueError(f"{node}: {name} has a batch of {n} but the other image {batch}; give 1 or {batch}.")
        _, height, width, _ = source.shape
        m = mask_batch(mask, node)
        if m.shape[0] not in (1, batch):
            raise ValueError(f"{node}: the mask has a batch of {m.shape[0]} for {batch} images; give 1 or {batch}.")
        m = fit_mask(m, height, width, node, "source image")
        gen = generated[..., :3]
        gh, gw = gen.shape[1:3]
        top, left, ch, cw = crop_box(height, width)
        if (gh, gw) == (height, width):
            top, left = 0, 0
        elif (gh, gw) != (ch, cw):
            log.warning("%s: the generated image is %dx%d but the source is %dx%d; it was resized (bilinear) to "
                        "fit.", node, gw, gh, width, height)
            gen = F.interpolate(gen.movedim(-1, 1).float(), size=(height, width), mode="bilinear").movedim(1, -1)
            top, left, gh, gw = 0, 0, height, width
        out = source.expand(batch, -1, -1, -1).clone()
        region = out[:, top:top + gh, left:left + gw, :3]
        m = m.expand(batch, -1, -1)[:, top:top + gh, left:left + gw, None].to(device=out.device, dtype=out.dtype)
        g = gen.to(device=out.device, dtype=out.dtype).expand(batch, -1, -1, -1)
        # Pixels the mask does not touch are copied from the source, never recomputed (exact to the bit).
        out[:, top:top + gh, left:left + gw, :3] = torch.where(m > 0, g * m + region * (1 - m), region)
        return (out,)
