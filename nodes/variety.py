"""ZImageSeedVariety: a MODEL patch that makes images differ more across seeds (zimage_core.sampling.variety).

The technique (seed-dependent noise on the caption features during the first steps) lives in
zimage_core; this node only hooks it into ComfyUI's sampling, on a clone of the model:

* a SAMPLER_SAMPLE wrapper hands the sampler's seed (KSampler's seed, SamplerCustomAdvanced's noise
  seed, ZImageTurboSampler's seed) to the diffusion model through transformer_options;
* a DIFFUSION_MODEL wrapper perturbs the positive caption rows of each model call whose step lies in the
  perturbed range, image i of a batch with noise from (seed, i). Negative (CFG) rows are left as they are.

So it works with any sampler node and with ComfyUI's native Z-Image model as well as ours.
"""

from __future__ import annotations

import logging

import comfy.patcher_extension
import torch

from ..zimage_core.sampling import SeedVariety, caption_noise, step_of, vary_caption
from .errors import check_widgets

log = logging.getLogger("ComfyUI-ZImage")

WRAPPER_KEY = "zimage_seed_variety"
SEED_OPTION = "zimage_variety_seed"


def _hand_seed_to_model(executor, guider, sigmas, extra_args, *args, **kwargs):
    options = extra_args.get("model_options", {}).setdefault("transformer_options", {})
    options[SEED_OPTION] = extra_args.get("seed")
    return executor(guider, sigmas, extra_args, *args, **kwargs)


class _PerturbCaptions:
    def __init__(self, variety: SeedVariety) -> None:
        self.variety = variety

    def __call__(self, executor, x, timesteps, context, *args, **kwargs):
        options = kwargs.get("transformer_options", {})
        seed, sigmas = options.get(SEED_OPTION), options.get("sample_sigmas")
        if not self.variety.enabled or seed is None or sigmas is None or context is None:
            return executor(x, timesteps, context, *args, **kwargs)
        sigma = options.get("sigmas", timesteps)
        step = step_of(float(torch.as_tensor(sigma).reshape(-1)[0]), sigmas)
        if not self.variety.applies_to_step(step, len(sigmas) - 1):
            return executor(x, timesteps, context, *args, **kwargs)
        # Rows are chunks of the latent batch, one chunk per conditioning (cond_or_uncond: 0 = positive).
        kinds = options.get("cond_or_uncond") or [0]
        per_chunk = max(context.shape[0] // len(kinds), 1)
        noise = torch.zeros(context.shape, dtype=torch.float32)
        for row in range(context.shape[0]):
            if kinds[min(row // per_chunk, len(kinds) - 1)] == 0:
                noise[row] = caption_noise(int(seed), row % per_chunk, tuple(context.shape[1:]))
        return executor(x, timesteps, vary_caption(context, noise, self.variety.strength), *args, **kwargs)


class ZImageSeedVariety:
    DESCRIPTION = ("Makes images differ more from seed to seed (Turbo tends to give near-identical images for "
                   "one prompt): adds seed-dependent noise to the prompt's features during the first steps only, "
                   "so the composition varies and the prompt still decides the result. strength 0 changes "
                   "nothing. Works with any sampler (ZImageTurboSampler, KSampler, SamplerCustomAdvanced).")
    CATEGORY = "Z-Image/sampling"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with seed variety (a patched copy; the input model is unchanged).",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Z-Image model (ZImageModelLoader or UNETLoader), LoRAs may be applied."}),
            "strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 4.0, "step": 0.05,
                                   "tooltip": "Noise on the prompt features, relative to each token's size. 0 = off "
                                              "(bit-identical to not using this node); 0.3-1 varies the "
                                              "composition; much higher drifts away from the prompt."}),
            "end": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 1.0, "step": 0.05,
                              "tooltip": "Fraction of the steps, from the first, that see the perturbed prompt "
                                         "(0.25 = the first 2 of 8 steps). Later steps see the exact prompt."}),
        }}

    def patch(self, model, strength: float, end: float):
        check_widgets(type(self), strength=strength, end=end)
        variety = SeedVariety(float(strength), float(end))
        patched = model.clone()
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY,
                                     _hand_seed_to_model)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                     _PerturbCaptions(variety))
        return (patched,)
