"""ZImageEmptyLatent: an empty core LATENT (16 channels) at a Z-Image size."""

from __future__ import annotations

import comfy.model_management as mm
import torch

from ..zimage_core.constants import LATENT_CHANNELS, MAX_SIDE, VAE_FACTOR
from ..zimage_core.constants import PIXEL_MULTIPLE as MULTIPLE

NODE_CATEGORY = "Z-Image/latent"


def crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the centre crop to multiples of MULTIPLE that ZImageVAEEncode applies;
    masks and the inpaint composite line up with the encoded image through the same box."""
    nh, nw = height // MULTIPLE * MULTIPLE, width // MULTIPLE * MULTIPLE
    return (height - nh) // 2, (width - nw) // 2, nh, nw


# Official Z-Image-Turbo resolutions of the 1024 tier (width × height).
PRESETS = {
    "1024x1024 (1:1)": (1024, 1024),
    "1152x896 (9:7)": (1152, 896),
    "896x1152 (7:9)": (896, 1152),
    "1152x864 (4:3)": (1152, 864),
    "864x1152 (3:4)": (864, 1152),
    "1248x832 (3:2)": (1248, 832),
    "832x1248 (2:3)": (832, 1248),
    "1280x720 (16:9)": (1280, 720),
    "720x1280 (9:16)": (720, 1280),
    "1344x576 (21:9)": (1344, 576),
    "576x1344 (9:21)": (576, 1344),
}


def check_size(width: int, height: int, where: str) -> None:
    bad = [(name, v) for name, v in (("width", width), ("height", height)) if v % MULTIPLE]
    if bad:
        parts = []
        for name, v in bad:
            lo, hi = v // MULTIPLE * MULTIPLE, (v // MULTIPLE + 1) * MULTIPLE
            parts.append(f"{name} {v} (use {lo} or {hi})" if lo else f"{name} {v} (use {hi})")
        raise ValueError(f"{where}: Z-Image needs width and height divisible by {MULTIPLE}; got "
                         + ", ".join(parts) + ".")


class ZImageEmptyLatent:
    DESCRIPTION = ("An empty latent at a Z-Image size (width and height divisible by 16). Pick one of the "
                   "official resolutions or 'custom' to use width/height. The output is a standard LATENT.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("An empty 16-channel latent for ZImageTurboSampler.",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 1024, "min": MULTIPLE, "max": MAX_SIDE, "step": MULTIPLE,
                              "tooltip": "Image width in pixels, a multiple of 16 (used when preset is custom)."}),
            "height": ("INT", {"default": 1024, "min": MULTIPLE, "max": MAX_SIDE, "step": MULTIPLE,
                               "tooltip": "Image height in pixels, a multiple of 16 (used when preset is custom)."}),
            "preset": (["custom", *PRESETS], {"default": "custom",
                                              "tooltip": "Official Z-Image-Turbo resolutions (~1 megapixel). "
                                                         "Anything but custom overrides width and height."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                   "tooltip": "How many images to generate at once (each gets its own noise)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, preset="custom"):
        """Queue-time check (ComfyUI then skips its own min/max check of these inputs, so it is done here);
        linked inputs arrive as None and are checked when the node runs."""
        if preset != "custom":
            return True if preset in PRESETS else f"unknown preset {preset!r}; choose one of {list(PRESETS)}"
        for name, value in (("width", width), ("height", height)):
            if value is not None and not (MULTIPLE <= value <= MAX_SIDE):
                return f"{name} {value} is outside {MULTIPLE}..{MAX_SIDE} pixels"
        try:
            check_size(width or MULTIPLE, height or MULTIPLE, "ZImageEmptyLatent")
        except ValueError as e:
            return str(e)
        return True

    def generate(self, width: int, height: int, preset: str = "custom", batch_size: int = 1):
        if preset != "custom":
            if preset not in PRESETS:
                raise ValueError(f"ZImageEmptyLatent: unknown preset {preset!r}; choose one of {list(PRESETS)}.")
            width, height = PRESETS[preset]
        check_size(width, height, "ZImageEmptyLatent")
        # ComfyUI's LATENT holds raw VAE latents for Flux-family models; zeros, as in EmptySD3LatentImage.
        samples = torch.zeros([batch_size, LATENT_CHANNELS, height // VAE_FACTOR, width // VAE_FACTOR], device=mm.intermediate_device())
        return ({"samples": samples},)
