"""Flow-matching schedule and samplers."""

from __future__ import annotations

from .inpaint import latent_inpaint_mask, sample_inpaint
from .samplers import (
    Denoiser,
    StepCallback,
    make_noise,
    model_placement,
    sample_euler,
    sample_img2img,
    sample_text_to_image,
)
from .schedule import MAX_STEPS, denoise_sigmas, flow_sigmas, img2img_sigmas, img2img_start_index

__all__ = [
    "Denoiser",
    "MAX_STEPS",
    "StepCallback",
    "denoise_sigmas",
    "flow_sigmas",
    "img2img_sigmas",
    "img2img_start_index",
    "latent_inpaint_mask",
    "make_noise",
    "model_placement",
    "sample_euler",
    "sample_img2img",
    "sample_inpaint",
    "sample_text_to_image",
]
