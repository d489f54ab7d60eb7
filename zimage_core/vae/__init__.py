"""The FLUX.1 VAE: network, pixels<->latents with tiling, loading."""

from __future__ import annotations

from .flux_vae import (
    FREE_FRACTION,
    LATENT_SCALE,
    LATENT_SHIFT,
    FluxVAE,
    decode_memory,
    decode_room,
    denormalize_latents,
    estimate_memory,
    normalize_latents,
    whole_pass_room,
)
from .latent_range import DECODE_BOUND, LatentRangeReport, limit_decode_latents
from .loading import convert_diffusers_vae_keys, load_vae
from .model import (
    ATTN_CHUNK_BYTES,
    CONFIG_LIMITS,
    AttnBlock,
    Decoder,
    Downsample,
    Encoder,
    FluxAEConfig,
    ResnetBlock,
    Upsample,
    fuse_norm_act,
)

__all__ = [
    "ATTN_CHUNK_BYTES",
    "AttnBlock",
    "CONFIG_LIMITS",
    "DECODE_BOUND",
    "FREE_FRACTION",
    "Decoder",
    "Downsample",
    "Encoder",
    "FluxAEConfig",
    "FluxVAE",
    "LATENT_SCALE",
    "LATENT_SHIFT",
    "LatentRangeReport",
    "ResnetBlock",
    "Upsample",
    "convert_diffusers_vae_keys",
    "decode_memory",
    "decode_room",
    "denormalize_latents",
    "estimate_memory",
    "fuse_norm_act",
    "limit_decode_latents",
    "load_vae",
    "normalize_latents",
    "whole_pass_room",
]
