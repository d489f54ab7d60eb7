"""The Z-Image samplers as ComfyUI nodes: KSampler with Z-Image-Turbo's schedule and defaults.

They take any Z-Image MODEL (ZImageModelLoader's, or UNETLoader's native one, with LoRAs and patches)
and sample with ComfyUI's own machinery (`comfy.sample.sample_custom`, Euler): conditioning semantics
(ConditioningCombine, timestep ranges, area/mask), the LATENT's `noise_mask` (inpainting), model
patches, previews, the progress bar and Cancel are exactly KSampler's. What they add is the schedule
(zimage_core.sampling: Turbo's shifted flow-matching sigmas, diffusers' img2img start), Z-Image's guidance
convention and checks with clear messages.
"""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..zimage_core.errors import SamplingError
from ..zimage_core.sampling import schedule
from . import inpaint
from .core_model import is_zimage_model
from .latent import LATENT_CHANNELS

NODE_CATEGORY = "Z-Image/sampling"
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
    return samples


def _check_model(model, node: str) -> None:
    if not is_zimage_model(model):
        name = type(getattr(model, "model", model)).__name__
        raise ValueError(f"{node}: this MODEL ({name}) is not a Z-Image model. Load z_image_turbo_bf16.safetensors "
                         "with ZImageModelLoader (or UNETLoader), or use KSampler for other models.")


def _check_conditioning(model, conditioning, name: str, node: str) -> None:
    if not conditioning:
        raise ValueError(f"{node}: {name} is empty. Connect a ZImageTextEncode (or CLIPTextEncode with a "
                         "Z-Image text encoder) output.")
    expected = model.model.model_config.unet_config.get("cap_feat_dim", 2560)
    for cond, _ in conditioning:
        if cond.ndim != 3 or cond.shape[-1] != expected:
            raise ValueError(
                f"{node}: the {name} text features have shape {tuple(cond.shape)} (width {cond.shape[-1]}), but "
                f"this Z-Image model expects width {expected} (Qwen3-4B gives 2560). The conditioning comes from "
                "a different text encoder: encode the prompt with qwen_3_4b.safetensors (ZImageTextEncoderLoader, "
                "or CLIPLoader type 'lumina2' + CLIPTextEncode).")


def _finite_callback(model, steps: int, node: str):
    """ComfyUI's preview/progress callback, plus a stop with a clear message when latents become NaN/inf."""
    preview = latent_preview.prepare_callback(model, steps)

    def callback(step, x0, x, total_steps):
        if not torch.isfinite(x).all():
            raise SamplingError(f"{node}: the latents became NaN/inf at step {step + 1} of {total_steps}. This "
                                "happens with fp16 compute; load the model with weight_dtype default or bf16.")
        preview(step, x0, x, total_steps)

    return callback


def sample(model, positive, negative, latent: dict, seed: int, sigmas: torch.Tensor, cfg: float,
           node: str, mask: torch.Tensor | None = None) -> tuple[dict]:
    """KSampler-style Euler sampling over explicit sigmas; returns the LATENT (other keys kept).

    A MASK, when given, becomes the latent's noise_mask (1 = repaint), which KSampler's machinery honours.
    """
    _check_model(model, node)
    _check_conditioning(model, positive, "positive", node)
    if negative is not positive:
        _check_conditioning(model, negative, "negative", node)
    latent = inpaint.latent_with_mask(latent, mask, node)
    samples = comfy.sample.fix_empty_latent_channels(model, _source_latents(latent, node))
    if inpaint.nothing_to_repaint(latent, node):
        return ({**latent, "samples": latent["samples"].clone()},)
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    steps = len(sigmas) - 1
    out = comfy.sample.sample_custom(
        model, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas, positive, negative, samples,
        noise_mask=latent.get("noise_mask"), callback=_finite_callback(model, steps, node),
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    return ({**latent, "samples": out},)


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

_MASK_INPUT = ("MASK", {"tooltip": "Inpainting: where to repaint (1 = repaint, 0 = keep), e.g. LoadImage's painted "
                                   "mask through ZImageInpaintMask. Replaces the latent's noise_mask; a mask of "
                                   "another size is fitted to the image (noted in the log)."})


class ZImageTurboSampler:
    DESCRIPTION = ("Text-to-image with Z-Image-Turbo: flow-matching Euler, 8 steps, shift 3, no CFG (KSampler "
                   "with Turbo's schedule). The latent's content is replaced by the seed's noise, except where "
                   "its noise mask (SetLatentNoiseMask, VAEEncodeForInpaint) keeps it: that is inpainting.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The generated latent; decode it with ZImageVAEDecode.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Z-Image model: ZImageModelLoader (LoRAs may be applied), or UNETLoader."}),
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
                "mask": _MASK_INPUT,
            },
        }

    def sample(self, model, positive, latent, seed: int, steps: int, shift: float, guidance: float,
               negative=None, mask=None):
        node = "ZImageTurboSampler"
        if guidance > 0 and negative is None:
            raise ValueError(f"{node}: guidance {guidance} > 0 needs a negative conditioning. Connect a "
                             "ZImageTextEncode to 'negative', or set guidance to 0 (Turbo is made for 0).")
        # Z-Image's guidance g: pred = pos + g·(pos − neg), which is ComfyUI's CFG with cfg = 1 + g. At
        # cfg 1 ComfyUI skips the negative pass, so the positive stands in when none is connected.
        negative = negative if guidance > 0 else positive
        return sample(model, positive, negative, latent, seed, schedule.flow_sigmas(steps, shift),
                      1.0 + guidance, node, mask)


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
                "model": ("MODEL", {"tooltip": "A Z-Image model: ZImageModelLoader (LoRAs may be applied), or UNETLoader."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt describing the result, from ZImageTextEncode."}),
                "latent": ("LATENT", {"tooltip": "The source image's latent, from ZImageVAEEncode."}),
                "strength": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.01,
                                       "tooltip": "How much to change the source: 0 keeps it, 1 replaces it. "
                                                  "With 8 steps, values below ~0.3 run very few steps."}),
                **_COMMON_INPUTS,
            },
            "optional": {
                "mask": _MASK_INPUT,
            },
        }

    def sample(self, model, positive, latent, strength: float, seed: int, steps: int, shift: float, mask=None):
        node = "ZImageImg2ImgSampler"
        sigmas = schedule.img2img_sigmas(steps, strength, shift)
        if len(sigmas) < 2:
            # Nothing to denoise: the source itself, bit for bit.
            _source_latents(latent, node)
            return ({**latent, "samples": latent["samples"].clone()},)
        return sample(model, positive, positive, latent, seed, sigmas, 1.0, node, mask)
