"""Seeded noise and the flow-matching Euler samplers for Z-Image-Turbo.

Any callable following the Denoiser protocol works as the model:
    model(x (B,C,H,W) in the model's dtype, sigma (B,) float32, cap_feats: list of (L_i, D)) -> v
where v = ε − x0 is the flow velocity dx/dσ. Latents are accumulated in float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from ..errors import SamplingError
from .guidance import cap_guided_norm, check_cfg_options, guidance_applies
from .schedule import MAX_STEPS, flow_sigmas, img2img_sigmas

__all__ = [
    "Denoiser",
    "StepCallback",
    "make_noise",
    "model_placement",
    "sample_euler",
    "sample_img2img",
    "sample_text_to_image",
]


class Denoiser(Protocol):
    """model(x, sigma, cap_feats) -> velocity v = ε − x0, same shape as x."""

    def __call__(self, x: Tensor, sigma: Tensor, cap_feats: list[Tensor]) -> Tensor: ...


# callback(step_index, total_steps, x_after_step, denoised_x0_prediction); raise inside it to abort.
StepCallback = Callable[[int, int, Tensor, Tensor], None]

_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Noise values one call may draw (the output, or the draws skipped to reach a batch_index): 2**31
# float32 values are 8 GiB, far past a batch of 4096 latents at 1024x1024 (2**30).
MAX_NOISE_VALUES = 2**31
MAX_NOISE_DRAWS = 2**20  # samples drawn in order to reach a batch_index (ComfyUI's repeats reach 2**18)


def make_noise(
    shape: Sequence[int],
    seed: int,
    dtype: torch.dtype = torch.float32,
    *,
    batch_index: Sequence[int] | None = None,
) -> Tensor:
    """Standard normal noise on the CPU, the same numbers ComfyUI's `comfy.sample.prepare_noise` draws.

    Drawing on the CPU from the seed makes a seed give the same image on any GPU. A private generator
    is used, so the global torch RNG is left alone (ComfyUI reseeds the global one; the numbers are
    identical). `batch_index` mirrors ComfyUI's LATENT "batch_index": sample k gets the noise of
    position batch_index[k] in a batch drawn one sample at a time.

    `seed` may be any whole number from -2**63 to 2**64 - 1 (what torch accepts; a negative seed is
    the same as seed + 2**64). At most MAX_NOISE_VALUES values are drawn, counting the samples
    skipped to reach the largest batch_index (at most MAX_NOISE_DRAWS of them).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not _SEED_MIN <= seed <= _SEED_MAX:
        raise ValueError(f"seed must be a whole number between -2**63 and 2**64 - 1 (ComfyUI uses 0 to "
                         f"{_SEED_MAX}), got {seed!r}.")
    sizes = [_whole(s) for s in shape] if isinstance(shape, Sequence) and not isinstance(shape, str) else [None]
    if not sizes or any(s is None or s < 0 for s in sizes):
        raise ValueError(f"shape must be a non-empty sequence of whole numbers >= 0 like (1, 16, 128, 128), "
                         f"got {shape!r}."[:400])
    shape = tuple(sizes)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype (noise is real-valued), got {dtype!r}.")
    per_sample = math.prod(shape[1:])
    if math.prod(shape) > MAX_NOISE_VALUES:
        raise ValueError(f"shape {shape} is {math.prod(shape):,} noise values, more than the limit of "
                         f"{MAX_NOISE_VALUES:,}; use a smaller batch or size.")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if batch_index is None:
        return torch.randn(shape, dtype=dtype, generator=generator, device="cpu")

    indices = [_whole(i) for i in batch_index] if isinstance(batch_index, (list, tuple)) else None
    if indices is None or len(indices) != shape[0] or any(i is None or i < 0 for i in indices):
        raise ValueError(
            f"batch_index must list {shape[0]} indices, whole numbers >= 0 (one per sample of shape {shape}), "
            f"got {batch_index!r}."[:400]
        )
    draws = max(indices, default=-1) + 1
    if draws > MAX_NOISE_DRAWS or draws * per_sample > MAX_NOISE_VALUES:
        raise ValueError(
            f"batch_index {draws - 1} needs {draws:,} noise samples of {per_sample:,} values drawn in order; "
            f"the limits are {MAX_NOISE_DRAWS:,} samples and {MAX_NOISE_VALUES:,} values. Use smaller batch indices."
        )
    # Sample at batch position p always gets the p-th draw, whatever else is in the batch; draws no
    # sample uses are discarded at once.
    wanted = set(indices)
    kept: dict[int, Tensor] = {}
    for p in range(draws):
        draw = torch.randn((1, *shape[1:]), dtype=dtype, generator=generator, device="cpu")
        if p in wanted:
            kept[p] = draw
    if not indices:
        return torch.empty(shape, dtype=dtype)
    return torch.cat([kept[i] for i in indices], dim=0)


def _whole(value: object) -> int | None:
    """A whole number (int, numpy/torch integer scalar), or None for anything else (bools, floats)."""
    if isinstance(value, bool):
        return None
    try:
        return int(value.__index__())  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return None


def model_placement(
    model: object, fallback_device: torch.device | str = "cpu"
) -> tuple[torch.device, torch.dtype]:
    """Device and compute dtype to run `model` in.

    The model's own `device`/`dtype` attributes if it has them (a wrapper can set them to override),
    else its first float parameter that is not an fp8 storage type (bfloat16 if all are fp8), else
    float32 on `fallback_device`.
    """
    device = getattr(model, "device", None)
    dtype = getattr(model, "dtype", None)
    if not isinstance(dtype, torch.dtype) or dtype not in _COMPUTE_DTYPES or device is None:
        params = getattr(model, "parameters", None)
        first = compute = None
        if callable(params):
            for p in params():
                first = p if first is None else first
                if p.dtype in _COMPUTE_DTYPES:
                    compute = p
                    break
        if first is not None:
            if not isinstance(dtype, torch.dtype) or dtype not in _COMPUTE_DTYPES:
                # fp8 weights are upcast per layer; bf16 is the safe compute dtype for this model.
                dtype = compute.dtype if compute is not None else torch.bfloat16
            if device is None:
                device = first.device
    if not isinstance(dtype, torch.dtype) or dtype not in _COMPUTE_DTYPES:
        dtype = torch.float32
    return torch.device(device if device is not None else fallback_device), dtype


def _check_latents(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor) or value.ndim != 4 or not value.is_floating_point():
        found = (
            f"{type(value).__name__} of shape {tuple(value.shape)}"
            if isinstance(value, Tensor)
            else type(value).__name__
        )
        raise ValueError(f"{name} must be a float tensor (B, 16, H/8, W/8), got {found}.")
    return value


def _check_conds(
    name: str, conds: object, batch: int, device: torch.device, dtype: torch.dtype
) -> list[Tensor]:
    """Per-sample caption features, broadcast from 1 to the batch, on the model's device and dtype."""
    if not isinstance(conds, (list, tuple)) or not all(isinstance(c, Tensor) for c in conds):
        raise ValueError(
            f"{name} must be a list of caption-feature tensors (L, D), one per image or one for all."
        )
    if len(conds) not in (1, batch):
        raise ValueError(
            f"{name} has {len(conds)} entries for a batch of {batch} latents; give 1 (shared) or {batch}."
        )
    for c in conds:
        if c.ndim != 2 or c.shape[0] == 0:
            raise ValueError(
                f"{name} entries must be 2-D (tokens, features) with >= 1 token, got {tuple(c.shape)}."
            )
    moved = [c.to(device=device, dtype=dtype) for c in conds]
    return moved * batch if len(moved) == 1 else moved


def _check_sigmas(sigmas: object) -> Tensor:
    try:
        sig = torch.as_tensor(sigmas, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        sig = None
    if (sig is None or sig.ndim != 1 or sig.numel() < 1 or sig.numel() > MAX_STEPS + 1
            or not bool(torch.isfinite(sig).all()) or bool((sig < 0).any())):
        raise ValueError(
            f"sigmas must be a 1-D sequence of 1 to {MAX_STEPS + 1} finite values >= 0 (e.g. 1 ... 0), "
            f"got {sigmas!r}."[:400]
        )
    if bool((sig[1:] > sig[:-1]).any()):
        i = int((sig[1:] > sig[:-1]).nonzero()[0])
        raise ValueError(
            f"sigmas must not increase (the sampler runs from noise, sigma 1, down to 0), but sigma {i + 1} "
            f"= {sig[i + 1].item():g} is above sigma {i} = {sig[i].item():g}."
        )
    return sig


def _check_guidance(guidance: float, negative: object) -> float:
    try:
        g = float(guidance)
    except (TypeError, ValueError):
        g = math.nan
    if not (math.isfinite(g) and g >= 0):
        raise ValueError(
            f"guidance must be a finite number >= 0 (0 = no CFG, Turbo's default), got {guidance!r}."
        )
    if g > 0 and negative is None:
        raise ValueError(
            f"guidance {g} > 0 needs `negative` caption features (encode an empty prompt '' for the usual default), "
            "or set guidance to 0 (Z-Image-Turbo is distilled to run without CFG)."
        )
    return g


def _check_each_step(device: torch.device) -> bool:
    """Whether to check latents for NaN/inf after every step (with a host sync) or once at the end."""
    return device.type == "cpu"


def non_finite_advice(dtype: torch.dtype | None, fp32_retry: str = "compute the model in float32") -> str:
    """What to change when the model gave NaN/inf, given the dtype it actually computed in: only float16
    overflows in Z-Image's activations; in bfloat16 or float32 the weights (checkpoint, LoRA, ControlNet) or a
    huge strength are the cause. `fp32_retry`: how the caller computes a step again in float32."""
    name = str(dtype).replace("torch.", "") if dtype is not None else "an unknown dtype"
    culprits = ("the checkpoint, a LoRA or a ControlNet has NaN/inf weights, or a LoRA / ControlNet strength is "
                "far too high: re-download the checkpoint, or remove (or lower) the LoRA / ControlNet")
    if dtype == torch.float16:
        return "float16 overflows in Z-Image's activations: compute in bfloat16 (bf16) instead."
    if dtype == torch.bfloat16:
        return (f"bfloat16 rarely overflows on this model, so most likely {culprits}. To tell, {fp32_retry}: if it "
                "fails in float32 too, the weights are the cause.")
    return f"The model already computes in {name}, so this is not an overflow: {culprits}."


def _non_finite_error(step: int, total: int, dtype: torch.dtype) -> SamplingError:
    name = str(dtype).replace("torch.", "")
    return SamplingError(
        f"Sampling produced non-finite latents (NaN/inf) at step {step + 1} of {total} with the model in {name}. "
        f"{non_finite_advice(dtype)}"
    )


@torch.no_grad()
def sample_euler(
    model: Denoiser,
    positive: list[Tensor],
    latents: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    guidance: float = 0.0,
    negative: list[Tensor] | None = None,
    callback: StepCallback | None = None,
    cfg_truncation: float | None = 1.0,
    cfg_normalization: float | bool = 0.0,
    after_step: Callable[[int, Tensor], Tensor] | None = None,
) -> Tensor:
    """Euler on the flow ODE from `latents` (already noised to sigmas[0]) down the given sigmas.

    x_{i+1} = x_i + (σ_{i+1} − σ_i)·v. With guidance g > 0: v = v_pos + g·(v_pos − v_neg), the positive
    and negative passes batched into one model call; CFG is skipped on steps where 1 − σ > cfg_truncation
    and, if cfg_normalization k > 0, the guided prediction's norm is capped at k·‖v_pos‖ (diffusers
    ZImagePipeline's options, off by default). `after_step(i, x)` may replace the latents after step i
    (inpainting puts the kept region back there). Returns float32 latents on the model's device.
    """
    sig = _check_sigmas(sigmas)
    latents = _check_latents("latents", latents)
    g = _check_guidance(guidance, negative)
    norm_cap, _ = check_cfg_options(cfg_normalization, 1.0 if cfg_truncation is None else cfg_truncation)
    device, dtype = model_placement(model, latents.device)
    x = latents.to(device=device, dtype=torch.float32)
    batch = x.shape[0]
    pos = _check_conds("positive", positive, batch, device, dtype)
    neg = _check_conds("negative", negative, batch, device, dtype) if g > 0 else []

    total = sig.numel() - 1
    sig_values = sig.tolist()

    # A per-step isfinite check costs a host sync, which on an accelerator stalls the queueing of the next
    # step; there we only record the first bad step on the device and check once at the end (the callback
    # may then see NaN previews of a run that will fail). On the CPU a per-step check is free and stops
    # at once.
    check_every_step = _check_each_step(device)
    first_bad = None if check_every_step else torch.full((), -1, dtype=torch.long, device=device)

    for i in range(total):
        sigma = sig_values[i]
        step_g = g if g > 0 and guidance_applies(sigma, cfg_truncation) else 0.0
        x_in = x.to(dtype)
        if step_g > 0:
            out = model(
                torch.cat([x_in, x_in]),
                torch.full((2 * batch,), sigma, dtype=torch.float32, device=device),
                pos + neg,
            )
            _check_output(out, (2 * batch, *x.shape[1:]))
            out = out.float()
            v_pos, v_neg = out[:batch], out[batch:]
            v = cap_guided_norm(v_pos + step_g * (v_pos - v_neg), v_pos, norm_cap)
        else:
            out = model(x_in, torch.full((batch,), sigma, dtype=torch.float32, device=device), pos)
            _check_output(out, tuple(x.shape))
            v = out.float()

        dt = sig[i + 1] - sig[i]  # float32 step, as the diffusers scheduler computes it
        denoised = x - sigma * v if callback is not None else None
        x = x + dt.item() * v
        if after_step is not None:
            x = after_step(i, x)

        if check_every_step:
            if not bool(torch.isfinite(x).all()):
                raise _non_finite_error(i, total, dtype)
        else:
            bad = ~torch.isfinite(x).all()
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, i), first_bad)
        if callback is not None:
            callback(i, total, x, denoised)

    if first_bad is not None:
        bad_step = int(first_bad)
        if bad_step >= 0:
            raise _non_finite_error(bad_step, total, dtype)
    return x


def _check_output(out: object, expected: tuple[int, ...]) -> None:
    if not isinstance(out, Tensor) or tuple(out.shape) != expected:
        found = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise SamplingError(
            f"The model returned {found} for latents of shape {expected}; expected the same shape."
        )


def sample_text_to_image(
    model: Denoiser,
    positive: list[Tensor],
    noise: Tensor,
    *,
    steps: int = 8,
    shift: float = 3.0,
    guidance: float = 0.0,
    negative: list[Tensor] | None = None,
    callback: StepCallback | None = None,
    sigmas: Tensor | Sequence[float] | None = None,
    cfg_truncation: float | None = 1.0,
    cfg_normalization: float | bool = 0.0,
) -> Tensor:
    """Text-to-image: start from σ0·noise (σ0 = 1 on the default schedule) and run Euler down the schedule.

    `noise` is (B,16,h,w) in normalized latent space (make_noise). `sigmas` overrides steps/shift.
    Returns normalized float32 latents on the model's device.
    """
    noise = _check_latents("noise", noise)
    sig = flow_sigmas(steps, shift) if sigmas is None else _check_sigmas(sigmas)
    device, _ = model_placement(model, noise.device)
    x = noise.to(device=device, dtype=torch.float32)
    if sig[0].item() != 1.0:
        x = sig[0].item() * x
    return sample_euler(
        model,
        positive,
        x,
        sig,
        guidance=guidance,
        negative=negative,
        callback=callback,
        cfg_truncation=cfg_truncation,
        cfg_normalization=cfg_normalization,
    )


def check_source(source_latents: object, noise: object) -> tuple[Tensor, Tensor]:
    """Source latents and noise of an image-to-image run: same shape, or a source of batch 1 shared by all."""
    source_latents = _check_latents("source_latents", source_latents)
    noise = _check_latents("noise", noise)
    if source_latents.shape[1:] != noise.shape[1:] or source_latents.shape[0] not in (1, noise.shape[0]):
        raise ValueError(
            f"source_latents {tuple(source_latents.shape)} and noise {tuple(noise.shape)} must have the same shape "
            "(or the source a batch of 1)."
        )
    return source_latents, noise


def sample_img2img(
    model: Denoiser,
    positive: list[Tensor],
    source_latents: Tensor,
    noise: Tensor,
    *,
    strength: float,
    steps: int = 8,
    shift: float = 3.0,
    guidance: float = 0.0,
    negative: list[Tensor] | None = None,
    callback: StepCallback | None = None,
    cfg_truncation: float | None = 1.0,
    cfg_normalization: float | bool = 0.0,
) -> Tensor:
    """Image-to-image as diffusers' ZImageImg2ImgPipeline: noise the source to σ_s, then the remaining steps.

    σ_s = img2img_sigmas(steps, strength, shift)[0]; start = σ_s·noise + (1 − σ_s)·source. strength 1 is
    text-to-image from the source's noise; strength 0 (or any strength leaving no step) returns the source
    unchanged without calling the model. Latents are normalized (B,16,h,w); a source of batch 1 is shared.
    """
    source_latents, noise = check_source(source_latents, noise)
    sig = img2img_sigmas(steps, strength, shift)
    device, _ = model_placement(model, noise.device)
    source = source_latents.to(device=device, dtype=torch.float32).expand(noise.shape[0], -1, -1, -1)
    if sig.numel() == 1:
        return source.clone()
    noise = noise.to(device=device, dtype=torch.float32)
    sigma0 = sig[:1].to(device)
    # Flow forward process, as FlowMatchEulerDiscreteScheduler.scale_noise.
    x = sigma0 * noise + (1.0 - sigma0) * source
    return sample_euler(
        model,
        positive,
        x,
        sig,
        guidance=guidance,
        negative=negative,
        callback=callback,
        cfg_truncation=cfg_truncation,
        cfg_normalization=cfg_normalization,
    )
