"""The Z-Image family's fixed numbers, owned here and imported everywhere else.

They hold for Turbo, Base and Omni alike (the same VAE, text encoder and transformer shape).
"""

from __future__ import annotations

import torch

LATENT_CHANNELS = 16  # FLUX.1 VAE latent channels
# The transformer sees latents normalised as (raw − LATENT_SHIFT) · LATENT_SCALE (ComfyUI's Flux latent format).
LATENT_SCALE = 0.3611
LATENT_SHIFT = 0.1159
VAE_FACTOR = 8  # pixels per latent cell
PATCH_SIZE = 2  # latent cells per side of one transformer token
PIXEL_MULTIPLE = VAE_FACTOR * PATCH_SIZE  # image sides: multiples of 16 pixels
SEQ_MULTIPLE = 32  # every token segment is padded to a multiple of this many tokens
TEXT_WIDTH = 2560  # Qwen3-4B hidden size: the caption feature width
SIGLIP_WIDTH = 1152  # SigLIP2 so400m feature width (Omni)
# Float dtypes the models compute in (fp16 only where it is safe: the text encoder never overflows it).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
