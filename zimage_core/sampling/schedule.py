"""Flow-matching sigma schedules for Z-Image-Turbo (shifted linear σ, Euler sampling).

The values match diffusers' ZImagePipeline: it hands `FlowMatchEulerDiscreteScheduler(shift=3.0,
use_dynamic_shifting=False)` the sigmas linspace(1, 1/N, N), which the scheduler shifts in float32 and
ends with 0. We do the same float32 arithmetic in the same order so the grids agree bit for bit.
"""

from __future__ import annotations

import math

import torch

__all__ = ["flow_sigmas", "img2img_sigmas", "denoise_sigmas", "img2img_start_index", "MAX_STEPS"]

# ComfyUI's KSampler allows 10000 steps; a schedule is allocated per step, so this bounds it.
MAX_STEPS = 10_000
MAX_SHIFT = 1e6  # far past any useful value; larger shifts overflow float32 into NaN sigmas


def _check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be a whole number >= 1 and <= {MAX_STEPS} (Z-Image-Turbo uses 8), "
                         f"got {steps!r}.")
    return steps


def _check_shift(shift: object) -> float:
    try:
        value = float(shift)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        value = math.nan
    if isinstance(shift, bool) or not (math.isfinite(value) and 0 < value <= MAX_SHIFT):
        raise ValueError(f"shift must be a finite number > 0 and <= {MAX_SHIFT:g} (Z-Image-Turbo uses 3.0), "
                         f"got {shift!r}.")
    return value


def _check_fraction(name: str, value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if isinstance(value, bool) or not 0.0 <= number <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be between 0.0 and 1.0 (inclusive), got {value!r}.")
    return number


def flow_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """σ schedule for `steps` Euler steps: steps+1 float32 values from 1 down to a final 0.

    σ = linspace(1, 1/N, N), shifted σ' = shift·σ / (1 + (shift−1)·σ), then 0 appended.
    8 steps, shift 3 → [1, .9545, .9, .8333, .75, .6429, .5, .3, 0].
    """
    steps = _check_steps(steps)
    shift = _check_shift(shift)
    sigmas = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float32)
    # Same operation order as diffusers (numpy float32 with a Python-float shift) → identical bits.
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def img2img_start_index(steps: int, strength: float) -> int:
    """Index into flow_sigmas(steps) where img2img starts: int(N − N·strength), as diffusers does."""
    steps = _check_steps(steps)
    strength = _check_fraction("strength", strength)
    init_timestep = min(steps * strength, steps)
    return int(max(steps - init_timestep, 0))


def img2img_sigmas(steps: int, strength: float, shift: float = 3.0) -> torch.Tensor:
    """The tail of flow_sigmas(steps, shift) that diffusers' ZImageImg2ImgPipeline runs for `strength`.

    It starts on the trained grid at index t_start = int(N − N·strength) and keeps the final 0, so it
    has N − t_start + 1 values (N − t_start Euler steps). strength 1 → the full schedule; strength 0 →
    just [0.] (no step: the source comes back unchanged).
    """
    start = img2img_start_index(steps, strength)
    return flow_sigmas(steps, shift)[start:].clone()


def denoise_sigmas(steps: int, denoise: float, shift: float = 3.0) -> torch.Tensor:
    """ComfyUI's KSampler `denoise` rule on our schedule: build int(steps/denoise) steps, keep the last steps+1.

    Unlike img2img_sigmas, this always runs `steps` model calls, on a finer grid. denoise 0 → [0.]
    (nothing to do). The finer grid has at most MAX_STEPS steps, so denoise must be >= steps / MAX_STEPS.
    """
    steps = _check_steps(steps)
    denoise = _check_fraction("denoise", denoise)
    if denoise == 0.0:
        return torch.zeros(1, dtype=torch.float32)
    if denoise > 0.9999:  # ComfyUI treats this as a full denoise
        return flow_sigmas(steps, shift)
    total = int(steps / denoise)
    if total > MAX_STEPS:
        raise ValueError(f"denoise {denoise:g} with {steps} steps needs a schedule of {total} steps, more than "
                         f"{MAX_STEPS}: use denoise >= {steps / MAX_STEPS:g} (or 0 for no denoising).")
    return flow_sigmas(total, shift)[-(steps + 1) :].clone()


def step_of(sigma: float, sigmas: torch.Tensor) -> int:
    """The 0-based step of a schedule `sigmas` (N+1 values, the last ends the run) whose start sigma is
    closest to `sigma`: which step a model call at `sigma` belongs to."""
    starts = torch.as_tensor(sigmas).detach().float().cpu().reshape(-1)
    if starts.numel() > 1:
        starts = starts[:-1]
    return int((starts - float(sigma)).abs().argmin())
