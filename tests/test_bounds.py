"""zimage_core's API refuses the widget values the nodes refuse (out of range, inf, NaN), naming the value."""

from __future__ import annotations

import math

import pytest
import torch

from zimage_core.controlnet import STRENGTH_LIMIT as CONTROL_LIMIT
from zimage_core.controlnet import ControlRun, control_window
from zimage_core.lora import STRENGTH_LIMIT as LORA_LIMIT
from zimage_core.lora import LoraReport, lora_strength
from zimage_core.sampling import sample_euler

BAD_LORA = [1e30, math.inf, -math.inf, math.nan, -1e9, LORA_LIMIT * 1.01, "x", None]


@pytest.mark.parametrize("value", BAD_LORA, ids=repr)
def test_lora_strength_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match=rf"strength_model must be a finite number >= -{LORA_LIMIT:g} and <= "):
        LoraReport(name="x.safetensors").text(value, 1.0)
    with pytest.raises(ValueError, match="strength must be a finite number"):
        lora_strength(value)


def test_lora_strength_in_range_is_kept():
    assert lora_strength(-LORA_LIMIT) == -LORA_LIMIT and lora_strength(0) == 0.0
    assert LoraReport(name="x").text(0.5, -1.0).startswith("LoRA x")


@pytest.mark.parametrize(("start", "end", "match"), [
    (-5.0, 1.0, "start_percent must be"), (0.0, 7.0, "end_percent must be"), (math.nan, 1.0, "start_percent must be"),
    (0.0, math.nan, "end_percent must be"), (math.inf, 1.0, "start_percent must be"), (0.8, 0.2, "swap them"),
])
def test_control_window_out_of_range_is_refused(start, end, match):
    with pytest.raises(ValueError, match=match):
        control_window(start, end)


def test_control_window_in_range_is_kept():
    assert control_window(0, 1) == (0.0, 1.0) and control_window(0.3, 0.3) == (0.3, 0.3)


@pytest.mark.parametrize("strength", [math.nan, math.inf, 1e30, -CONTROL_LIMIT * 2])
def test_control_strength_out_of_range_is_refused(strength):
    with pytest.raises(ValueError, match="strength must be a finite number"):
        ControlRun(None, torch.zeros(0), strength, style="diffusers", axes_dims=(8, 12, 12), rope_theta=256.0)


@pytest.mark.parametrize("guidance", [math.nan, math.inf, -1.0])
def test_guidance_nan_or_negative_is_refused_before_sampling(guidance):
    calls = []

    def model(x, t, caps):
        calls.append(t)
        return torch.zeros_like(x)

    with pytest.raises(ValueError, match="guidance must be a finite number >= 0"):
        sample_euler(model, [torch.zeros(3, 8)], torch.zeros(1, 16, 4, 4), [1.0, 0.0], guidance=guidance,
                     negative=[torch.zeros(3, 8)])
    assert not calls


def test_control_latents_refuse_a_nan_mask():
    from zimage_core.controlnet import control_latents

    image = torch.full((1, 16, 16, 3), 0.5)
    mask = torch.zeros(1, 16, 16)
    mask[0, 2, 2] = math.nan
    for style in ("diffusers", "comfyui"):
        with pytest.raises(ValueError, match="mask has NaN/inf values"):
            control_latents(lambda x: torch.zeros(x.shape[0], 16, 2, 2), 33, control_image=image, inpaint_image=image,
                            mask=mask, style=style)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_latents_message_fits_the_compute_dtype(dtype):
    from zimage_core.errors import SamplingError

    class Model:
        def __init__(self) -> None:
            self.dtype, self.device = dtype, torch.device("cpu")

        def __call__(self, x, t, caps):
            return torch.full_like(x, math.nan)

    with pytest.raises(SamplingError) as err:
        sample_euler(Model(), [torch.zeros(3, 8)], torch.zeros(1, 16, 4, 4), [1.0, 0.5, 0.0])
    message = str(err.value)
    name = str(dtype).replace("torch.", "")
    assert f"with the model in {name}" in message
    if dtype == torch.float16:
        assert "compute in bfloat16 (bf16) instead" in message
    else:
        assert "float16 overflows" not in message and "in bfloat16 (bf16)" not in message
        assert "NaN/inf weights" in message
