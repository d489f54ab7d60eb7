"""ZImageVAEEncode / ZImageVAEDecode: core IMAGE ⇄ core LATENT (raw FLUX latents) with the FLUX VAE."""

from __future__ import annotations

import logging

from .latent import MULTIPLE

NODE_CATEGORY = "Z-Image/vae"
log = logging.getLogger("ComfyUI-ZImage")


class ZImageVAEDecode:
    DESCRIPTION = "Decodes a Z-Image latent to an image with the FLUX.1 VAE."
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image (batch, height, width, RGB in 0..1).",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("ZIMAGE_VAE", {"tooltip": "From ZImageVAELoader (ae.safetensors)."}),
            "latent": ("LATENT", {"tooltip": "The latent to decode, e.g. from ZImageTurboSampler."}),
        }}

    def decode(self, vae, latent):
        samples = latent["samples"]
        if samples.ndim != 4 or samples.shape[1] != 16:
            raise ValueError(f"ZImageVAEDecode: expected a 16-channel latent (batch, 16, h, w), got "
                             f"{tuple(samples.shape)}; this latent is not from a Z-Image/FLUX model.")
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
            "vae": ("ZIMAGE_VAE", {"tooltip": "From ZImageVAELoader (ae.safetensors)."}),
            "image": ("IMAGE", {"tooltip": "The image to encode, e.g. from LoadImage."}),
        }}

    def encode(self, vae, image):
        h, w = image.shape[1], image.shape[2]
        nh, nw = h // MULTIPLE * MULTIPLE, w // MULTIPLE * MULTIPLE
        if nh == 0 or nw == 0:
            raise ValueError(f"ZImageVAEEncode: the image is {w}x{h}; Z-Image needs at least 16x16 pixels.")
        if (nh, nw) != (h, w):
            top, left = (h - nh) // 2, (w - nw) // 2
            log.warning("ZImageVAEEncode: cropping %dx%d to %dx%d (sides must be multiples of 16)", w, h, nw, nh)
            image = image[:, top:top + nh, left:left + nw]
        return ({"samples": vae.encode(image[..., :3])},)
