"""ZImageVAEEncode / ZImageVAEDecode: core IMAGE ⇄ core LATENT (raw FLUX latents) with a core VAE.

With ZImageVAELoader's VAE they run zimage_core's FluxVAE directly: tiles chosen from free memory
(whole batch, one image at a time, or tiles after an out-of-memory error) and, after ZImageCompileVAE,
the fused kernels. Any other 16-channel VAE goes through ComfyUI's own VAE code.
"""

from __future__ import annotations

import logging

from .core_vae import ZImageCoreVAE, checked_for_decode
from .latent import LATENT_CHANNELS, crop_box

NODE_CATEGORY = "Z-Image/vae"
log = logging.getLogger("ComfyUI-ZImage")


class ZImageVAEDecode:
    DESCRIPTION = ("Decodes a Z-Image latent to an image with the FLUX.1 VAE. Unlike VAEDecode, it picks "
                   "whole-batch, per-image or tiled decoding from the free memory and uses ZImageCompileVAE's "
                   "fused kernels.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image (batch, height, width, RGB in 0..1).",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("VAE", {"tooltip": "From ZImageVAELoader (ae.safetensors) or VAELoader."}),
            "latent": ("LATENT", {"tooltip": "The latent to decode, e.g. from ZImageTurboSampler."}),
        }}

    def decode(self, vae, latent):
        samples = latent["samples"]
        if samples.ndim != 4 or samples.shape[1] != LATENT_CHANNELS:
            raise ValueError(f"ZImageVAEDecode: expected a 16-channel latent (batch, 16, h, w), got "
                             f"{tuple(samples.shape)}; this latent is not from a Z-Image/FLUX model.")
        _check_vae(vae, "ZImageVAEDecode")
        samples = checked_for_decode(samples, "ZImageVAEDecode")
        if isinstance(vae, ZImageCoreVAE):
            return (vae.decode_auto(samples),)
        return (vae.decode(samples),)


class ZImageVAEEncode:
    DESCRIPTION = ("Encodes an image to a Z-Image latent with the FLUX.1 VAE (for ZImageImg2ImgSampler). "
                   "Images whose sides are not multiples of 16 are centre-cropped to the nearest multiple.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The image's latent.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("VAE", {"tooltip": "From ZImageVAELoader (ae.safetensors) or VAELoader."}),
            "image": ("IMAGE", {"tooltip": "The image to encode, e.g. from LoadImage."}),
        }}

    def encode(self, vae, image):
        h, w = image.shape[1], image.shape[2]
        top, left, nh, nw = crop_box(h, w)
        if nh == 0 or nw == 0:
            raise ValueError(f"ZImageVAEEncode: the image is {w}x{h}; Z-Image needs at least 16x16 pixels.")
        if (nh, nw) != (h, w):
            log.warning("ZImageVAEEncode: cropping %dx%d to %dx%d (sides must be multiples of 16)", w, h, nw, nh)
            image = image[:, top:top + nh, left:left + nw]
        _check_vae(vae, "ZImageVAEEncode")
        if isinstance(vae, ZImageCoreVAE):
            return ({"samples": vae.encode_auto(image[..., :3])},)
        return ({"samples": vae.encode(image[..., :3])},)


def _check_vae(vae, node: str) -> None:
    if getattr(vae, "latent_channels", None) != LATENT_CHANNELS:
        raise ValueError(f"{node}: this VAE has {getattr(vae, 'latent_channels', '?')} latent channels; Z-Image "
                         "uses the 16-channel FLUX.1 VAE (ae.safetensors). Load it with ZImageVAELoader.")
