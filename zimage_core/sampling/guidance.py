"""Z-Image's classifier-free guidance options, as diffusers' ZImagePipeline applies them, and the presets.

Guidance g: pred = pos + g·(pos − neg) (active for g > 0; ComfyUI's cfg = 1 + g). Two options of Z-Image
(Base) sampling, both off by default:
- cfg_truncation t: no guidance on steps whose normalised time 1 − σ is above t (the last, low-noise steps);
  1.0 keeps guidance on every step.
- cfg_normalization k: the guided prediction's norm (per image) is capped at k × the positive prediction's;
  0 = off. diffusers also takes True, read as 1.0.
They act on the velocity (or on σ·velocity, as ComfyUI's CFG sees it): the cap is a ratio of norms, so a
per-image factor such as σ does not change it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SamplingPreset", "PRESETS", "guidance_applies", "cap_guided_norm", "check_cfg_options"]


@dataclass(frozen=True)
class SamplingPreset:
    steps: int
    shift: float
    guidance: float


# Z-Image-Turbo: its scheduler config (shift 3) and model card (8 steps, no CFG). Z-Image (Base): its
# scheduler_config.json says shift 6.0; the model card recommends 28-50 steps and CFG 3-5 (30 and 4 here).
PRESETS = {
    "Z-Image-Turbo (8 steps, shift 3, no CFG)": SamplingPreset(8, 3.0, 0.0),
    "Z-Image Base (30 steps, shift 6, CFG 4)": SamplingPreset(30, 6.0, 4.0),
}


def check_cfg_options(cfg_normalization: object, cfg_truncation: object) -> tuple[float, float]:
    """The two options as floats; ValueError naming the bad one (normalization >= 0, truncation 0..1)."""
    values = []
    for name, value, lo, hi in (("cfg_normalization", cfg_normalization, 0.0, math.inf),
                                ("cfg_truncation", cfg_truncation, 0.0, 1.0)):
        try:
            number = float(value)  # type: ignore[arg-type]  (True, as diffusers takes it, is 1.0)
        except (TypeError, ValueError):
            number = math.nan
        if not (lo <= number <= hi) or math.isinf(number):
            what = "a finite number >= 0 (0 = off, 1 = the positive prediction's norm)" if hi == math.inf \
                else "between 0.0 and 1.0 (1.0 = guidance on every step)"
            raise ValueError(f"{name} must be {what}, got {value!r}.")
        values.append(number)
    return values[0], values[1]


def guidance_applies(sigma: float, cfg_truncation: float | None) -> bool:
    """Whether guidance runs on the step at `sigma`: 1 − σ, computed as ZImagePipeline does it
    ((1000 − 1000σ)/1000 in float32), is not above `cfg_truncation` (None: always)."""
    if cfg_truncation is None:
        return True
    s = torch.tensor(float(sigma), dtype=torch.float32)
    t_norm = float((1000 - s * 1000) / 1000)
    return t_norm <= float(cfg_truncation)


def cap_guided_norm(pred: Tensor, pos: Tensor, factor: float) -> Tensor:
    """`pred` scaled per image (dim 0) so that its norm is at most `factor` × the norm of `pos`;
    unchanged where it already is, and everywhere when `factor` is 0 (off)."""
    if factor <= 0:
        return pred
    pos_norm = torch.linalg.vector_norm(pos.flatten(1), dim=1)
    new_norm = torch.linalg.vector_norm(pred.flatten(1), dim=1)
    max_norm = pos_norm * factor
    scale = torch.where(new_norm > max_norm, max_norm / new_norm, torch.ones_like(new_norm))
    return pred * scale.view(-1, *([1] * (pred.ndim - 1)))
