"""Flow-matching schedule and samplers."""

from __future__ import annotations

from .guidance import PRESETS, SamplingPreset, cap_guided_norm, check_cfg_options, guidance_applies
from .inpaint import latent_inpaint_mask, sample_inpaint
from .samplers import (
    Denoiser,
    StepCallback,
    make_noise,
    model_placement,
    non_finite_advice,
    sample_euler,
    sample_img2img,
    sample_text_to_image,
)
from .schedule import MAX_STEPS, denoise_sigmas, flow_sigmas, img2img_sigmas, img2img_start_index, step_of
from .variety import SeedVariety, caption_noise, noise_seed, vary_caption

__all__ = [
    "Denoiser",
    "PRESETS",
    "SamplingPreset",
    "cap_guided_norm",
    "check_cfg_options",
    "guidance_applies",
    "SeedVariety",
    "MAX_STEPS",
    "StepCallback",
    "caption_noise",
    "denoise_sigmas",
    "flow_sigmas",
    "img2img_sigmas",
    "img2img_start_index",
    "latent_inpaint_mask",
    "make_noise",
    "model_placement",
    "noise_seed",
    "non_finite_advice",
    "sample_euler",
    "sample_img2img",
    "sample_inpaint",
    "sample_text_to_image",
    "step_of",
    "vary_caption",
]
