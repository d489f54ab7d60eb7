"""The Z-Image family's fixed numbers, owned here and imported everywhere else.

They hold for Turbo, Base and Omni alike (the same VAE, text encoder and transformer shape). Free of torch, so
the main job checks sizes with the system's Python before anything is installed.
"""

from __future__ import annotations

LATENT_CHANNELS = 16  # FLUX.1 VAE latent channels
# The transformer sees latents normalised as (raw − LATENT_SHIFT) · LATENT_SCALE (ComfyUI's Flux latent format).
LATENT_SCALE = 0.3611
LATENT_SHIFT = 0.1159
VAE_FACTOR = 8  # pixels per latent cell
PATCH_SIZE = 2  # latent cells per side of one transformer token
PIXEL_MULTIPLE = VAE_FACTOR * PATCH_SIZE  # image sides: multiples of 16 pixels
MAX_SIDE = 4096  # pixels per side the nodes and the main job accept
SEQ_MULTIPLE = 32  # every token segment is padded to a multiple of this many tokens
TEXT_WIDTH = 2560  # Qwen3-4B hidden size: the caption feature width
SIGLIP_WIDTH = 1152  # SigLIP2 so400m feature width (Omni)
