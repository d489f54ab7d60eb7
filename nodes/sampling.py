"""The Z-Image samplers as ComfyUI nodes: progress bar with latent previews, Cancel, core LATENT in/out.

The sampling itself is zimage_core.sampling; this module only converts ComfyUI's types (raw Flux
latents, CONDITIONING), draws the seed's noise exactly like ComfyUI (CPU generator) and wires the
per-step callback to ComfyUI's progress bar, previewer and interrupt flag.
"""

from __future__ import annotations

import logging

import comfy.latent_formats
import comfy.model_management as mm
import comfy.utils
import latent_preview
import torch

from ..zimage_core import sampling as core_sampling
from ..zimage_core import vae as core_vae
from .conditioning import conditioning_to_caption_features
from .latent import LATENT_CHANNELS

NODE_CATEGORY = "Z-Image/sampling"
log = logging.getLogger("ComfyUI-ZImage")
SEED_MAX = 0xFFFFFFFFFFFFFFFF


def _source_latents(latent: dict, node: str) -> torch.Tensor:
    samples = latent["samples"]
    if samples.ndim != 4 or samples.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"{node}: expected a 16-channel image latent (batch, 16, h, w), got shape "
                         f"{tuple(samples.shape)}. Use ZImageEmptyLatent or ZImageVAEEncode (or a FLUX VAE).")
    h, w = samples.shape[-2:]
    if h % 2 or w % 2:
        raise ValueError(f"{node}: the latent is {w * 8}x{h * 8} pixels; Z-Image needs width and height "
                         "divisible by 16. Resize the image or use ZImageEmptyLatent.")
    if latent.get("noise_mask") is not None:
        log.warning("%s: the latent has a noise mask (inpainting); it is ignored, the whole image is "
                    "sampled.", node)
    return samples


def _captions(model, positive, negative, guidance: float, node: str):
    dim = getattr(getattr(model.module, "config", None), "cap_feat_dim", None)
    pos = conditioning_to_caption_features(positive, f"{node} positive", dim)
    neg = None
    if guidance > 0:
        if negative is None:
            raise ValueError(f"{node}: guidance {guidance} > 0 needs a negative conditioning. Connect a "
                             "ZImageTextEncode to 'negative', or set guidance to 0 (Turbo is made for 0).")
        neg = conditioning_to_caption_features(negative, f"{node} negative", dim)
    return pos, neg


def _step_callback(steps: int, device: torch.device):
    """Progress bar + latent preview per step; checks ComfyUI's interrupt flag so Cancel stops the run
    between two transformer calls (the exception unwinds and frees every intermediate tensor)."""
    previewer = latent_preview.get_previewer(device, comfy.latent_formats.Flux())
    pbar = comfy.utils.ProgressBar(steps)

    def callback(step: int, total: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        mm.throw_exception_if_processing_interrupted()
        preview = None
        if previewer is not None:
            # zimage_core's x0 is in the model's normalized space, the space Flux's previewer expects.
            preview = previewer.decode_latent_to_preview_image("JPEG", x0.float())
        pbar.update_absolute(step + 1, total, preview)

    return callback


def _finish(result: torch.Tensor, latent: dict) -> tuple[dict]:
    out = {k: v for k, v in latent.items() if k not in ("samples", "noise_mask")}
    out["samples"] = core_vae.denormalize_latents(result.float()).to(mm.intermediate_device())
    return (out,)


_COMMON_INPUTS = {
    "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                     "tooltip": "Seed of the starting noise (drawn on the CPU, so a seed gives the same image "
                                "on any GPU, as in ComfyUI's KSampler)."}),
    "steps": ("INT", {"default": 8, "min": 1, "max": 100,
                      "tooltip": "Denoising steps (transformer calls). Turbo is distilled for 8."}),
    "shift": ("FLOAT", {"default": 3.0, "min": 0.1, "max": 100.0, "step": 0.1,
                        "tooltip": "Flow-matching timestep shift. 3.0 is Z-Image-Turbo's value; higher spends "
                                   "more steps at high noise."}),
}


class ZImageTurboSampler:
    DESCRIPTION = ("Text-to-image with Z-Image-Turbo: flow-matching Euler, 8 steps, shift 3, no CFG. Only the "
                   "latent's size and batch are used; its content is replaced by the seed's noise.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The generated latent; decode it with ZImageVAEDecode.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("ZIMAGE_MODEL", {"tooltip": "From ZImageModelLoader."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt, from ZImageTextEncode."}),
                "latent": ("LATENT", {"tooltip": "Size and batch of the images, from ZImageEmptyLatent."}),
                **_COMMON_INPUTS,
                "guidance": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.1,
                                       "tooltip": "Classifier-free guidance: 0 = off (Turbo is distilled for "
                                                  "no CFG). Above 0 it needs a negative prompt and runs the "
                                                  "transformer twice per step."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt; used only when guidance > 0."}),
            },
        }

    def sample(self, model, positive, latent, seed: int, steps: int, shift: float, guidance: float,
               negative=None):
        node = "ZImageTurboSampler"
        samples = _source_latents(latent, node)
        pos, neg = _captions(model, positive, negative, guidance, node)
        noise = core_sampling.make_noise(tuple(samples.shape), seed, batch_index=latent.get("batch_index"))
        passes = 2 if neg is not None else 1
        model.load(tuple(samples.shape), max(c.shape[0] for c in pos), passes)
        device = model.patcher.load_device
        result = core_sampling.sample_text_to_image(
            model.denoiser(), pos, noise.to(device), steps=steps, shift=shift, guidance=guidance,
            negative=neg, callback=_step_callback(steps, device))
        return _finish(result, latent)


class ZImageImg2ImgSampler:
    DESCRIPTION = ("Image-to-image / editing with Z-Image-Turbo: noises the source latent to 'strength' and "
                   "denoises it with the prompt (diffusers' ZImageImg2ImgPipeline schedule). strength 0 "
                   "returns the source unchanged, 1 ignores it.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The edited latent; decode it with ZImageVAEDecode.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("ZIMAGE_MODEL", {"tooltip": "From ZImageModelLoader."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt describing the result, from ZImageTextEncode."}),
                "latent": ("LATENT", {"tooltip": "The source image's latent, from ZImageVAEEncode."}),
                "strength": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.01,
                                       "tooltip": "How much to change the source: 0 keeps it, 1 replaces it. "
                                                  "With 8 steps, values below ~0.3 run very few steps."}),
                **_COMMON_INPUTS,
            },
        }

    def sample(self, model, positive, latent, strength: float, seed: int, steps: int, shift: float):
        node = "ZImageImg2ImgSampler"
        samples = _source_latents(latent, node)
        if strength <= 0:
            # Nothing to denoise: the source itself, bit for bit (no normalize/denormalize round trip).
            return ({**{k: v for k, v in latent.items() if k != "noise_mask"}, "samples": samples.clone()},)
        pos, _ = _captions(model, positive, None, 0.0, node)
        noise = core_sampling.make_noise(tuple(samples.shape), seed, batch_index=latent.get("batch_index"))
        model.load(tuple(samples.shape), max(c.shape[0] for c in pos))
        device = model.patcher.load_device
        source = core_vae.normalize_latents(samples.to(device, torch.float32))
        result = core_sampling.sample_img2img(
            model.denoiser(), pos, source, noise.to(device), strength=strength, steps=steps, shift=shift,
            callback=_step_callback(steps, device))
        return _finish(result, latent)
