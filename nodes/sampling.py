"""The Z-Image samplers as ComfyUI nodes: KSampler with Z-Image-Turbo's schedule and defaults.

They take any Z-Image MODEL (ZImageModelLoader's, or UNETLoader's native one, with LoRAs and patches)
and sample with ComfyUI's own machinery (`comfy.sample.sample_custom`, Euler): conditioning semantics
(ConditioningCombine, timestep ranges, area/mask), the LATENT's `noise_mask` (inpainting), model
patches, previews, the progress bar and Cancel are exactly KSampler's. What they add is the schedule
(zimage_core.sampling: the shifted flow-matching sigmas, diffusers' img2img start), Z-Image's guidance
convention with its two options (cfg_normalization, cfg_truncation, as model options any KSampler honours:
`zimage_guidance`), the Turbo and Base presets and checks with clear messages.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..zimage_core.errors import SamplingError
from ..zimage_core.sampling import (
    PRESETS,
    cap_guided_norm,
    check_cfg_options,
    guidance_applies,
    non_finite_advice,
    schedule,
)
from . import inpaint
from .core_model import fp32_compute, is_zimage_model
from .errors import check_widgets
from .latent import LATENT_CHANNELS

NODE_CATEGORY = "Z-Image/sampling"
SEED_MAX = 0xFFFFFFFFFFFFFFFF
log = logging.getLogger("ComfyUI-ZImage")

# What the samplers do when a step gives NaN/inf latents (the `on_nan` input).
ON_NAN_ERROR = "error"
ON_NAN_RECOMPUTE = "recompute_fp32"
ON_NAN_MODES = [ON_NAN_ERROR, ON_NAN_RECOMPUTE]
RECOVERY_KEY = "zimage_nan_recovery"


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


def model_compute_dtype(model) -> torch.dtype:
    """The dtype the MODEL's transformer computes in: ours says so (compute_dtype; fp8/fp16 storage computes in
    bf16, CPU in fp32), ComfyUI's native one through its manual cast dtype or weight dtype."""
    dtype = getattr(model.model.diffusion_model, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return model.model.manual_cast_dtype or model.model.get_dtype()


def _finite_callback(model, steps: int, node: str):
    """ComfyUI's preview/progress callback, plus a stop with a clear message when latents become NaN/inf.

    Each step's check is read one step later (or by `finish()` after the last step): reading it at once would
    make the host wait for the GPU at every step, and the GPU then waits for the host's next launches."""
    preview = latent_preview.prepare_callback(model, steps)
    pending: list[tuple[int, int, torch.Tensor, Any]] = []

    def fail(step: int, total_steps: int) -> None:
        dtype = model_compute_dtype(model)
        raise SamplingError(f"{node}: the latents became NaN/inf at step {step + 1} of {total_steps} with the "
                            f"model computing in {str(dtype).replace('torch.', '')}. "
                            + non_finite_advice(dtype, "set on_nan to recompute_fp32")
                            + (" Load the model with weight_dtype default or bf16 (both compute in bf16), or set "
                               "on_nan to recompute_fp32." if dtype == torch.float16 else ""))

    def finish() -> None:
        while pending:
            step, total_steps, ok, done = pending.pop(0)
            if done is not None:
                done.synchronize()
            if not bool(ok):
                pending.clear()
                fail(step, total_steps)

    def callback(step, x0, x, total_steps):
        # ComfyUI calls back before applying step `step`: its denoised x0 comes from this step's model
        # output (x only shows it one step later, and never for the last step).
        finish()  # the previous step's check, long done on the GPU by now
        ok = torch.isfinite(x0).all() & torch.isfinite(x).all()
        done = None
        if ok.is_cuda:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(ok, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            ok = host
        pending.append((step, total_steps, ok, done))
        preview(step, x0, x, total_steps)

    callback.finish = finish  # type: ignore[attr-defined]
    return callback


class _RecomputeInFp32:
    """DIFFUSION_MODEL wrapper of the recovery mode: a model call whose output has NaN/inf (fp16/bf16
    overflow) is computed again in float32 and sampling goes on with that result, with a warning naming
    the step. If float32 fails too, the weights themselves are broken: a clear error."""

    def __init__(self, node: str) -> None:
        self.node = node

    def __call__(self, executor, x, timesteps, context, *args, **kwargs):
        out = executor(x, timesteps, context, *args, **kwargs)
        if bool(torch.isfinite(out).all()):  # one host sync per model call: the price of this mode
            return out
        options = kwargs.get("transformer_options", {})
        sigmas = options.get("sample_sigmas")
        sigma = float(torch.as_tensor(options.get("sigmas", timesteps)).reshape(-1)[0])
        where = (f"step {schedule.step_of(sigma, sigmas) + 1} of {len(sigmas) - 1}" if sigmas is not None
                 else f"sigma {sigma:.4g}")
        dtype = str(x.dtype).replace("torch.", "")
        if x.dtype == torch.float32:
            raise SamplingError(f"{self.node}: the model gave NaN/inf at {where} in float32 already. "
                                + non_finite_advice(torch.float32))
        log.warning("%s: %s gave NaN/inf in %s; recomputing that step in float32 and continuing.",
                    self.node, where, dtype)
        with fp32_compute(executor.class_obj):
            out = executor(x.float(), timesteps, context.float() if context is not None else None, *args, **kwargs)
        if not bool(torch.isfinite(out).all()):
            raise SamplingError(f"{self.node}: the model gave NaN/inf at {where}, also when recomputed in float32. "
                                + non_finite_advice(torch.float32))
        return out


def with_nan_recovery(model, node: str):
    """A clone of `model` whose NaN/inf model calls are recomputed in float32 (outermost DIFFUSION_MODEL
    wrapper, so the recomputation runs every other wrapper and patch again)."""
    patched = model.clone()
    kind = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    others = {k: v for k, v in patched.wrappers.get(kind, {}).items() if k != RECOVERY_KEY}
    patched.wrappers[kind] = {RECOVERY_KEY: [_RecomputeInFp32(node)], **others}
    return patched


def _first_sigma(sigma) -> float:
    return float(torch.as_tensor(sigma).reshape(-1)[0])


class _TruncatedCFG:
    """sampler_calc_cond_batch_function: on steps past cfg_truncation the negative prediction is not
    computed (ComfyUI runs the positive alone) and the positive stands in for it, so ComfyUI's CFG gives
    the positive prediction exactly, as ZImagePipeline does with guidance dropped."""

    def __init__(self, truncation: float, previous=None) -> None:
        self.truncation = truncation
        self.previous = previous

    def __call__(self, args):
        conds, x, sigma = args["conds"], args["input"], args["sigma"]
        skip = len(conds) > 1 and conds[1] is not None and not guidance_applies(_first_sigma(sigma), self.truncation)
        if skip:
            conds = [conds[0], None]
            args = {**args, "conds": conds}
        if self.previous is not None:
            out = self.previous(args)
        else:
            out = comfy.samplers.calc_cond_batch(args["model"], conds, x, sigma, args["model_options"])
        return [out[0], out[0]] if skip else out


class _NormalizedCFG:
    """sampler_post_cfg_function: the guided prediction's norm (per image) capped at `factor` × the positive
    prediction's, on the steps that are guided. ComfyUI's predictions are denoised latents; x − denoised is
    σ·velocity, whose norm ratio is the velocity's."""

    def __init__(self, factor: float, truncation: float) -> None:
        self.factor = factor
        self.truncation = truncation

    def __call__(self, args):
        denoised = args["denoised"]
        if (args.get("uncond") is None or math.isclose(args["cond_scale"], 1.0)
                or not guidance_applies(_first_sigma(args["sigma"]), self.truncation)):
            return denoised
        x = args["input"]
        return x - cap_guided_norm(x - denoised, x - args["cond_denoised"], self.factor)


def zimage_guidance(model, cfg_normalization: float, cfg_truncation: float):
    """A clone of `model` whose CFG (any sampler: ours, KSampler, SamplerCustom) follows Z-Image's two options:
    no guidance past `cfg_truncation` (1.0 = every step guided) and the guided prediction's norm capped at
    `cfg_normalization` × the positive's (0 = off). `model` itself when both are off."""
    normalization, truncation = check_cfg_options(cfg_normalization, cfg_truncation)
    if normalization <= 0 and truncation >= 1.0:
        return model
    patched = model.clone()
    if truncation < 1.0:
        previous = patched.model_options.get("sampler_calc_cond_batch_function")
        patched.set_model_sampler_calc_cond_batch_function(_TruncatedCFG(truncation, previous))
    if normalization > 0:
        patched.set_model_sampler_post_cfg_function(_NormalizedCFG(normalization, truncation))
    return patched


def sample(model, positive, negative, latent: dict, seed: int, sigmas: torch.Tensor, cfg: float,
           node: str, mask: torch.Tensor | None = None, on_nan: str = ON_NAN_ERROR,
           cfg_normalization: float = 0.0, cfg_truncation: float = 1.0) -> tuple[dict]:
    """KSampler-style Euler sampling over explicit sigmas; returns the LATENT (other keys kept).

    A MASK, when given, becomes the latent's noise_mask (1 = repaint), which KSampler's machinery honours.
    With cfg > 1, cfg_normalization / cfg_truncation are Z-Image's guidance options (zimage_guidance).
    """
    _check_model(model, node)
    if on_nan not in ON_NAN_MODES:
        raise ValueError(f"{node}: on_nan must be one of {ON_NAN_MODES}, got {on_nan!r}.")
    try:
        check_cfg_options(cfg_normalization, cfg_truncation)
    except ValueError as e:
        raise ValueError(f"{node}: {e}") from None
    if cfg > 1.0:
        model = zimage_guidance(model, cfg_normalization, cfg_truncation)
    if on_nan == ON_NAN_RECOMPUTE:
        model = with_nan_recovery(model, node)
    _check_conditioning(model, positive, "positive", node)
    if negative is not positive:
        _check_conditioning(model, negative, "negative", node)
    latent = inpaint.latent_with_mask(latent, mask, node)
    samples = comfy.sample.fix_empty_latent_channels(model, _source_latents(latent, node))
    if inpaint.nothing_to_repaint(latent, node):
        return ({**latent, "samples": latent["samples"].clone()},)
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    steps = len(sigmas) - 1
    callback = _finite_callback(model, steps, node)
    out = comfy.sample.sample_custom(
        model, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas, positive, negative, samples,
        noise_mask=latent.get("noise_mask"), callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    callback.finish()  # the last step's check
    return ({**latent, "samples": out},)


_COMMON_INPUTS = {
    "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                     "tooltip": "Seed of the starting noise (drawn on the CPU, so a seed gives the same image "
                                "on any GPU, as in ComfyUI's KSampler)."}),
    "steps": ("INT", {"default": 8, "min": 1, "max": 100,
                      "tooltip": "Denoising steps (transformer calls). Turbo is distilled for 8; Z-Image (Base) "
                                 "wants 28-50."}),
    "shift": ("FLOAT", {"default": 3.0, "min": 0.1, "max": 100.0, "step": 0.1,
                        "tooltip": "Flow-matching timestep shift. 3.0 is Z-Image-Turbo's value, 6.0 Z-Image "
                                   "(Base)'s; higher spends more steps at high noise."}),
}
_ON_NAN_INPUT = {
    "on_nan": (ON_NAN_MODES, {"default": ON_NAN_ERROR,
                              "tooltip": "If a step gives NaN/inf latents (fp16/bf16 overflow, black images): "
                                         "'error' stops with a message naming the step; 'recompute_fp32' computes "
                                         "that step again in float32 and continues (with a warning). The check "
                                         "costs one GPU sync per step in recompute_fp32 mode."}),
}
PRESET_CUSTOM = "custom"
_GUIDANCE_TOOLTIP = ("Classifier-free guidance g (Z-Image's: positive + g x (positive - negative), KSampler's "
                     "cfg 1 + g): 0 = off (Turbo is distilled for no CFG); Z-Image (Base) uses 3-5. Above 0 it "
                     "needs a negative prompt and runs the transformer on both prompts each step.")
# Widgets added after the first release go last, so older workflows' widget values still line up.
_CFG_OPTIONS = {
    "cfg_normalization": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                    "tooltip": "Z-Image (Base) CFG normalization: the guided prediction's size is "
                                               "capped at this many times the positive prediction's. 0 = off "
                                               "(stylised images); 1.0 = on (realism, per the model card). Only "
                                               "with guidance > 0."}),
    "cfg_truncation": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                 "tooltip": "Z-Image (Base) CFG truncation: no guidance on the last steps, where "
                                            "the normalised time 1 - sigma is above this (those steps run the "
                                            "positive prompt only). 1.0 = guidance on every step."}),
    "preset": ([PRESET_CUSTOM, *PRESETS], {"default": PRESET_CUSTOM,
                                            "tooltip": "Official settings: Z-Image-Turbo (8 steps, shift 3, no "
                                                       "CFG) or Z-Image Base (30 steps, shift 6 as its scheduler "
                                                       "config says, CFG 4). Anything but custom overrides "
                                                       "steps, shift and guidance."}),
}

_MASK_INPUT = ("MASK", {"tooltip": "Inpainting: where to repaint (1 = repaint, 0 = keep), e.g. LoadImage's painted "
                                   "mask through ZImageInpaintMask. Replaces the latent's noise_mask; a mask of "
                                   "another size is fitted to the image (noted in the log)."})
_NEGATIVE_INPUT = ("CONDITIONING", {"tooltip": "Negative prompt (ZImageTextEncode: what to avoid, e.g. 'low "
                                               "quality, blurry'); used only when guidance > 0."})


def _preset(preset: str, steps: int, shift: float, guidance: float, node: str) -> tuple[int, float, float]:
    if preset == PRESET_CUSTOM:
        return steps, shift, guidance
    if preset not in PRESETS:
        raise ValueError(f"{node}: unknown preset {preset!r}; choose one of {[PRESET_CUSTOM, *PRESETS]}.")
    p = PRESETS[preset]
    return p.steps, p.shift, p.guidance


def _guided_negative(positive, negative, guidance: float, node: str):
    """The negative conditioning to sample with: ComfyUI skips the negative pass at cfg 1, so the positive
    stands in when guidance is 0."""
    if guidance > 0 and negative is None:
        raise ValueError(f"{node}: guidance {guidance} > 0 needs a negative conditioning. Connect a "
                         "ZImageTextEncode to 'negative' (what to avoid, e.g. 'low quality, blurry'), or set guidance to 0 "
                         "(Z-Image-Turbo is made for 0).")
    return negative if guidance > 0 else positive


class ZImageTurboSampler:
    DESCRIPTION = ("Text-to-image with Z-Image: flow-matching Euler (KSampler with Z-Image's schedule). Turbo: 8 "
                   "steps, shift 3, no CFG; Z-Image (Base): 30 steps, shift 6, guidance 4 with a negative prompt "
                   "and diffusers' cfg_normalization / cfg_truncation (the preset sets these). The latent's "
                   "content is replaced by the seed's noise, except where its noise mask (SetLatentNoiseMask, "
                   "VAEEncodeForInpaint) keeps it: that is inpainting.")
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
                                       "tooltip": _GUIDANCE_TOOLTIP}),
            },
            "optional": {
                "negative": _NEGATIVE_INPUT,
                "mask": _MASK_INPUT,
                **_ON_NAN_INPUT,
                **_CFG_OPTIONS,
            },
        }

    def sample(self, model, positive, latent, seed: int, steps: int, shift: float, guidance: float,
               negative=None, mask=None, on_nan: str = ON_NAN_ERROR, cfg_normalization: float = 0.0,
               cfg_truncation: float = 1.0, preset: str = PRESET_CUSTOM):
        node = "ZImageTurboSampler"
        check_widgets(type(self), steps=steps, shift=shift, guidance=guidance)  # NaN passes ComfyUI's min/max
        steps, shift, guidance = _preset(preset, steps, shift, guidance, node)
        negative = _guided_negative(positive, negative, guidance, node)
        # Z-Image's guidance g: pred = pos + g·(pos − neg), which is ComfyUI's CFG with cfg = 1 + g.
        return sample(model, positive, negative, latent, seed, schedule.flow_sigmas(steps, shift),
                      1.0 + guidance, node, mask, on_nan, cfg_normalization, cfg_truncation)


class ZImageImg2ImgSampler:
    DESCRIPTION = ("Image-to-image / editing with Z-Image: noises the source latent to 'strength' and "
                   "denoises it with the prompt (diffusers' ZImageImg2ImgPipeline schedule). strength 0 "
                   "returns the source unchanged, 1 ignores it. Guidance (with a negative prompt), "
                   "cfg_normalization and cfg_truncation as in ZImageTurboSampler.")
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
                "negative": _NEGATIVE_INPUT,
                "mask": _MASK_INPUT,
                **_ON_NAN_INPUT,
                "guidance": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.1,
                                       "tooltip": _GUIDANCE_TOOLTIP}),
                **_CFG_OPTIONS,
            },
        }

    def sample(self, model, positive, latent, strength: float, seed: int, steps: int, shift: float, mask=None,
               on_nan: str = ON_NAN_ERROR, negative=None, guidance: float = 0.0, cfg_normalization: float = 0.0,
               cfg_truncation: float = 1.0, preset: str = PRESET_CUSTOM):
        node = "ZImageImg2ImgSampler"
        check_widgets(type(self), strength=strength, steps=steps, shift=shift, guidance=guidance)
        steps, shift, guidance = _preset(preset, steps, shift, guidance, node)
        sigmas = schedule.img2img_sigmas(steps, strength, shift)
        if len(sigmas) < 2:
            # Nothing to denoise: the source itself, bit for bit.
            _source_latents(latent, node)
            return ({**latent, "samples": latent["samples"].clone()},)
        negative = _guided_negative(positive, negative, guidance, node)
        return sample(model, positive, negative, latent, seed, sigmas, 1.0 + guidance, node, mask, on_nan,
                      cfg_normalization, cfg_truncation)


class ZImageCFGOptions:
    DESCRIPTION = ("Z-Image (Base)'s two CFG options for any sampler (KSampler, SamplerCustomAdvanced...): "
                   "cfg_truncation stops guidance on the last steps, cfg_normalization caps the guided "
                   "prediction's size, as diffusers' ZImagePipeline does. Z-Image's guidance g is KSampler's "
                   "cfg 1 + g (Base: cfg 5 for g 4). ZImageTurboSampler has both built in.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the options set (a patched clone; the input model is unchanged).",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Z-Image model (ZImageModelLoader or UNETLoader)."}),
            "cfg_normalization": _CFG_OPTIONS["cfg_normalization"],
            "cfg_truncation": _CFG_OPTIONS["cfg_truncation"],
        }}

    def patch(self, model, cfg_normalization: float, cfg_truncation: float):
        node = "ZImageCFGOptions"
        _check_model(model, node)
        try:
            return (zimage_guidance(model, cfg_normalization, cfg_truncation),)
        except ValueError as e:
            raise ValueError(f"{node}: {e}") from None
