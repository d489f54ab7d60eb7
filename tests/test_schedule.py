"""Flow sigma schedules against diffusers' FlowMatchEulerDiscreteScheduler as ZImage(Img2Img)Pipeline drives it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers.pipelines.z_image.pipeline_z_image import (
    calculate_shift,
    get_default_z_image_sigmas,
    retrieve_timesteps,
)
from diffusers.pipelines.z_image.pipeline_z_image_img2img import ZImageImg2ImgPipeline

from tests.sampling_fixtures import zimage_scheduler
from zimage_core.sampling import denoise_sigmas, flow_sigmas, img2img_sigmas


def pipeline_scheduler(steps: int, shift: float = 3.0):
    """A scheduler after ZImagePipeline.__call__ set it up for `steps` (1024² → image_seq_len 4096)."""
    sch = zimage_scheduler()
    if shift != 3.0:
        sch = type(sch).from_config(sch.config, shift=shift)
    mu = calculate_shift(
        4096,
        sch.config.get("base_image_seq_len", 256),
        sch.config.get("max_image_seq_len", 4096),
        sch.config.get("base_shift", 0.5),
        sch.config.get("max_shift", 1.15),
    )
    retrieve_timesteps(sch, steps, "cpu", sigmas=get_default_z_image_sigmas(steps), mu=mu)
    return sch


def test_eight_step_turbo_schedule_values():
    # The published Turbo schedule (ZIMAGE_FACTS §5) and the closed form, computed in float64 here.
    published = [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0]
    sig = flow_sigmas(8)
    assert sig.dtype == torch.float32 and sig.shape == (9,)
    assert sig.tolist() == pytest.approx(published, abs=5e-5)
    closed = [3 * s / (1 + 2 * s) for s in (1 - k / 8 for k in range(8))] + [0.0]
    assert sig.tolist() == pytest.approx(closed, abs=1e-7)
    assert sig[-1].item() == 0.0 and sig[0].item() == 1.0


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 9, 20, 50])
def test_flow_sigmas_equal_diffusers_scheduler(steps, shift):
    sch = pipeline_scheduler(steps, shift)
    assert torch.equal(flow_sigmas(steps, shift), sch.sigmas)
    # The pipeline's transformer calls run at the scheduler timesteps = 1000·σ.
    assert torch.equal(flow_sigmas(steps, shift)[:-1] * 1000, sch.timesteps)


@pytest.mark.parametrize("strength", [0.0, 0.05, 0.3, 0.5, 0.6, 0.75, 0.99, 1.0])
@pytest.mark.parametrize("steps", [1, 4, 8, 9])
def test_img2img_sigmas_follow_img2img_pipeline(steps, strength):
    sch = pipeline_scheduler(steps)
    timesteps, n = ZImageImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=sch), steps, strength, "cpu")
    expected = sch.sigmas[sch.begin_index :]
    got = img2img_sigmas(steps, strength)
    assert torch.equal(got, expected)
    assert got.numel() - 1 == n
    assert torch.equal(got[:-1] * 1000, timesteps)


def test_img2img_strength_edges():
    assert torch.equal(img2img_sigmas(8, 1.0), flow_sigmas(8))
    assert img2img_sigmas(8, 0.0).tolist() == [0.0]
    # int(8 − 8·0.6) = 3 → starts at σ = 0.8333 with 5 steps left.
    assert img2img_sigmas(8, 0.6).numel() == 6
    assert img2img_sigmas(8, 0.6)[0].item() == pytest.approx(0.8333, abs=5e-5)


def test_denoise_sigmas_comfyui_rule():
    assert torch.equal(denoise_sigmas(8, 1.0), flow_sigmas(8))
    half = denoise_sigmas(8, 0.5)
    assert torch.equal(half, flow_sigmas(16)[-9:])
    assert half.numel() == 9 and half[-1].item() == 0.0
    assert torch.equal(denoise_sigmas(3, 0.4), flow_sigmas(7)[-4:])
    assert denoise_sigmas(8, 0.0).tolist() == [0.0]


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "8", None])
def test_bad_steps_are_rejected(steps):
    with pytest.raises(ValueError, match=r"steps must be a whole number >= 1.*got") as info:
        flow_sigmas(steps)
    assert repr(steps) in str(info.value)


@pytest.mark.parametrize("shift", [0, -1.0, math.nan, math.inf, "x"])
def test_bad_shift_is_rejected(shift):
    with pytest.raises(ValueError, match=r"shift must be a finite number > 0") as info:
        flow_sigmas(8, shift)
    assert repr(shift) in str(info.value)
    with pytest.raises(ValueError, match=r"shift"):
        img2img_sigmas(8, 0.5, shift)


@pytest.mark.parametrize("strength", [-0.1, 1.01, math.nan, None])
def test_bad_strength_is_rejected(strength):
    with pytest.raises(ValueError, match=r"strength must be between 0.0 and 1.0") as info:
        img2img_sigmas(8, strength)
    assert repr(strength) in str(info.value)
    with pytest.raises(ValueError, match=r"denoise must be between 0.0 and 1.0"):
        denoise_sigmas(8, strength)


def test_step_count_is_bounded_and_the_message_says_so():
    from zimage_core.sampling import MAX_STEPS

    assert flow_sigmas(MAX_STEPS).numel() == MAX_STEPS + 1  # the bound itself is allowed
    with pytest.raises(ValueError, match=rf"steps must be a whole number >= 1 and <= {MAX_STEPS}.*got 10001"):
        flow_sigmas(MAX_STEPS + 1)


def test_tiny_denoise_names_the_smallest_usable_value():
    # (denoise 1e-12, which asked for 8e12 steps, is tried in a capped child in test_hostile_files.)
    with pytest.raises(ValueError, match=r"denoise 0.0001 with 8 steps needs a schedule of 80000 steps.*"
                                         r"use denoise >= 0.0008"):
        denoise_sigmas(8, 1e-4)
    assert denoise_sigmas(8, 0.0008).numel() == 9  # the value the message names works


@pytest.mark.parametrize("shift", [1e300, True])
def test_shift_upper_bound(shift):
    with pytest.raises(ValueError, match=r"shift must be a finite number > 0 and <= 1e\+06"):
        flow_sigmas(8, shift)
