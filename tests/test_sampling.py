"""Samplers against diffusers' ZImagePipeline / ZImageImg2ImgPipeline, noise against ComfyUI's prepare_noise."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.comfyui_reference import require_comfyui
from tests.sampling_fixtures import (
    USE_ZIMAGE_TRANSFORMER,
    build_diffusers_transformer,
    build_flux_vae,
    caption_feats,
    diffusers_sigma_to_timestep,
    img2img_inputs_like_pipeline,
    img2img_pipeline,
    make_denoiser,
    rel_err,
    text_to_image_pipeline,
)
from zimage_core import SamplingError, make_noise, sample_img2img, sample_text_to_image
from zimage_core.sampling import flow_sigmas, img2img_sigmas
from zimage_core.sampling import samplers as sampling_mod

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
LATENT = (16, 8, 8)  # a 64×64 image
PIXELS = 64


@pytest.fixture(scope="module")
def transformer():
    return build_diffusers_transformer(seed=0)


@pytest.fixture(scope="module")
def denoiser(transformer, tmp_path_factory):
    return make_denoiser(transformer, tmp_path_factory.mktemp("denoiser"))


class CountingDenoiser:
    """Records each call's batch size and input dtype, then defers to the wrapped Denoiser."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.dtype = inner.dtype
        self.device = inner.device
        self.calls: list[tuple[int, torch.dtype, torch.Tensor]] = []

    def __call__(self, x, sigma, cap_feats):
        self.calls.append((x.shape[0], x.dtype, sigma.clone()))
        return self.inner(x, sigma, cap_feats)


class OracleDenoiser:
    """Knows the answer: along the straight path x = σ·ε + (1−σ)·x0 its velocity is exactly ε − x0."""

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, x0: torch.Tensor) -> None:
        self.x0 = x0

    def __call__(self, x, sigma, cap_feats):
        return (x - self.x0) / sigma.view(-1, 1, 1, 1)


# --- noise -------------------------------------------------------------------------------------------------

NOISE_CASES = {
    "single": ((1, *LATENT), 0, None),
    "batch": ((3, 16, 5, 7), 123456789012, None),
    "max_seed": ((2, 16, 4, 4), 2**64 - 1, None),
    "batch_index": ((3, 16, 4, 6), 42, [2, 0, 2]),
}


@pytest.fixture(scope="module")
def comfy_noise(tmp_path_factory) -> dict[str, torch.Tensor]:
    """ComfyUI's own prepare_noise, run in a subprocess so its global state stays out of this process."""
    comfy_dir = require_comfyui()
    out = tmp_path_factory.mktemp("comfy_noise") / "noise.safetensors"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(comfy_dir)!r})
        import comfy.options
        comfy.options.enable_args_parsing(False)
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        import torch, comfy.sample
        from safetensors.torch import save_file
        cases = {NOISE_CASES!r}
        result = {{}}
        for name, (shape, seed, inds) in cases.items():
            result[name] = comfy.sample.prepare_noise(torch.zeros(shape), seed, inds).contiguous()
        result["bf16"] = comfy.sample.prepare_noise(torch.zeros((1, 16, 4, 4), dtype=torch.bfloat16), 7).contiguous()
        save_file(result, {str(out)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out)


@pytest.mark.parametrize("case", list(NOISE_CASES))
def test_make_noise_equals_comfyui_prepare_noise(case, comfy_noise):
    shape, seed, inds = NOISE_CASES[case]
    noise = make_noise(shape, seed, batch_index=inds)
    assert noise.device.type == "cpu" and noise.dtype == torch.float32
    assert torch.equal(noise, comfy_noise[case])


def test_make_noise_bf16_equals_comfyui(comfy_noise):
    assert torch.equal(make_noise((1, 16, 4, 4), 7, torch.bfloat16), comfy_noise["bf16"])


def test_make_noise_leaves_global_rng_alone():
    state = torch.get_rng_state()
    make_noise((1, *LATENT), 5)
    assert torch.equal(state, torch.get_rng_state())
    assert not torch.equal(make_noise((1, *LATENT), 5), make_noise((1, *LATENT), 6))


@pytest.mark.parametrize("seed", [-(2**63) - 1, 2**64, 1.5, True, "1"])
def test_make_noise_rejects_bad_seed(seed):
    with pytest.raises(ValueError, match="seed must be a whole number"):
        make_noise((1, *LATENT), seed)


def test_make_noise_rejects_bad_batch_index():
    with pytest.raises(ValueError, match="batch_index must list 2 indices"):
        make_noise((2, *LATENT), 0, batch_index=[0])
    for bad in (["a", 1], [0.5, 1], [True, 0], "01", [-1, 0]):
        with pytest.raises(ValueError, match="batch_index must list 2 indices"):
            make_noise((2, *LATENT), 0, batch_index=bad)


def test_make_noise_seed_range_in_the_message_is_the_range_accepted():
    # -1 is accepted (torch wraps it: the same noise as 2**64 - 1), so the message must not say "from 0".
    assert torch.equal(make_noise((1, *LATENT), -1), make_noise((1, *LATENT), 2**64 - 1))
    assert make_noise((1, *LATENT), -(2**63)).shape == (1, *LATENT)
    with pytest.raises(ValueError) as info:
        make_noise((1, *LATENT), 2**64)
    assert "between -2**63 and 2**64 - 1" in str(info.value)


def test_make_noise_refuses_non_float_dtypes_and_shapes():
    with pytest.raises(ValueError, match="dtype must be a floating-point torch dtype"):
        make_noise((1, *LATENT), 0, dtype=torch.int64)
    for shape in ((1, 16, 8.5, 8), (1, -16, 8, 8), "1168", None, ()):
        with pytest.raises(ValueError, match="shape must be a non-empty sequence of whole numbers"):
            make_noise(shape, 0)


def test_make_noise_with_batch_index_keeps_only_what_it_returns():
    # Same numbers as drawing every sample up to the index (ComfyUI's prepare_noise), which the first
    # test above checks against ComfyUI itself; here: a far index gives that position's draw.
    full = make_noise((40, *LATENT), 3)
    assert torch.equal(make_noise((2, *LATENT), 3, batch_index=[39, 5]), full[[39, 5]])


# --- text to image -----------------------------------------------------------------------------------------


def run_pipeline(transformer, latents, positive, **kwargs) -> torch.Tensor:
    pipe = text_to_image_pipeline(transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt_embeds=positive,
        latents=latents,
        height=PIXELS,
        width=PIXELS,
        num_inference_steps=kwargs.pop("steps", 8),
        output_type="latent",
        **kwargs,
    ).images


@pytest.mark.parametrize("lengths", [[7], [7, 12]], ids=["b1", "b2"])
def test_text_to_image_matches_pipeline(transformer, denoiser, lengths):
    noise = make_noise((len(lengths), *LATENT), 11)
    positive = caption_feats(lengths, seed=1)
    expected = run_pipeline(transformer, noise, positive, guidance_scale=0.0)
    counting = CountingDenoiser(denoiser)
    got = sample_text_to_image(counting, positive, noise)
    err = rel_err(got, expected)
    print(f"txt2img {lengths}: rel err {err:.2e}")
    assert err <= TOL
    assert got.dtype == torch.float32 and got.shape == noise.shape
    assert len(counting.calls) == 8 and all(b == len(lengths) for b, _, _ in counting.calls)
    # The sampler really moved the latents (guards against comparing two no-ops).
    assert rel_err(got, noise) > 0.1


def test_pipeline_passes_one_minus_sigma_as_timestep(transformer, monkeypatch):
    # The convention our transformer must follow: diffusers hands the network t = (1000 − 1000σ)/1000 = 1 − σ.
    seen = []
    forward = transformer.forward

    def recording_forward(x, t, *args, **kwargs):
        seen.append(t.clone())
        return forward(x, t, *args, **kwargs)

    monkeypatch.setattr(transformer, "forward", recording_forward)
    run_pipeline(transformer, make_noise((1, *LATENT), 1), caption_feats([4], seed=0), guidance_scale=0.0)
    sig = flow_sigmas(8)[:-1]
    assert torch.equal(torch.stack(seen)[:, 0], diffusers_sigma_to_timestep(sig))
    assert torch.allclose(torch.stack(seen)[:, 0], 1 - sig, atol=1e-6, rtol=0)


def test_bf16_model_matches_bf16_pipeline(transformer):
    bf16 = build_diffusers_transformer(seed=0).to(torch.bfloat16)
    noise = make_noise((1, *LATENT), 15)
    positive = [c.to(torch.bfloat16) for c in caption_feats([7], seed=9)]
    expected = run_pipeline(bf16, noise, positive, guidance_scale=0.0)
    counting = CountingDenoiser(make_denoiser(bf16))
    got = sample_text_to_image(counting, [c.float() for c in positive], noise)
    err = rel_err(got, expected)
    print(f"txt2img bf16: rel err {err:.2e}")
    # Wrapping diffusers' own model, the sampler must be exact. Our transformer rounds differently
    # in bf16 (RoPE in the compute dtype, fused qkv): bf16 has an 8-bit mantissa (eps 3.9e-3), so
    # after 8 steps a difference well under one bf16 ulp of the output is the right bar (measured ~5e-4).
    assert err <= (2e-3 if USE_ZIMAGE_TRANSFORMER else TOL)
    assert got.dtype == torch.float32 and all(dt == torch.bfloat16 for _, dt, _ in counting.calls)


def test_single_positive_broadcasts_to_batch(transformer, denoiser):
    noise = make_noise((2, *LATENT), 12)
    (pe,) = caption_feats([9], seed=2)
    expected = run_pipeline(transformer, noise, [pe, pe], guidance_scale=0.0)
    got = sample_text_to_image(denoiser, [pe], noise)
    assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize(
    "guidance, options",
    [
        (2.5, {}),
        (2.5, {"cfg_truncation": 0.5}),
        # The tiny random model barely listens to captions; a large scale makes the norm cap bite.
        (40.0, {"cfg_normalization": True}),
        (40.0, {"cfg_normalization": 1.01}),
        (40.0, {"cfg_normalization": True, "cfg_truncation": 0.5}),
    ],
    ids=["plain", "truncation", "normalization", "normalization1.01", "normalization+truncation"],
)
def test_cfg_matches_pipeline(transformer, denoiser, guidance, options):
    noise = make_noise((2, *LATENT), 13)
    positive = caption_feats([7, 12], seed=3)
    negative = caption_feats([5, 9], seed=4)
    expected = run_pipeline(
        transformer, noise, positive, guidance_scale=guidance, negative_prompt_embeds=negative, **options
    )
    counting = CountingDenoiser(denoiser)
    got = sample_text_to_image(counting, positive, noise, guidance=guidance, negative=negative, **options)
    err = rel_err(got, expected)
    print(f"cfg {guidance} {options}: rel err {err:.2e}")
    assert err <= TOL
    no_cfg = sample_text_to_image(denoiser, positive, noise)
    assert rel_err(got, no_cfg) > 1e-3  # CFG changed the result
    # Positive and negative share one model call per guided step.
    cfg_steps = sum(1 for s in flow_sigmas(8)[:-1].tolist() if 1 - s <= options.get("cfg_truncation", 1.0))
    assert [b for b, _, _ in counting.calls] == [4] * cfg_steps + [2] * (8 - cfg_steps)
    if "cfg_truncation" in options:
        assert 0 < cfg_steps < 8
    if "cfg_normalization" in options:  # the norm cap actually bit
        uncapped = sample_text_to_image(denoiser, positive, noise, guidance=guidance, negative=negative)
        assert rel_err(got, uncapped) > 1e-3


def test_custom_sigmas_match_pipeline(transformer, denoiser):
    noise = make_noise((1, *LATENT), 14)
    positive = caption_feats([6], seed=5)
    custom = [1.0, 0.8, 0.55, 0.25]
    # The pipeline shifts the sigmas it is given; hand ours the shifted ones it will use.
    expected = run_pipeline(transformer, noise, positive, steps=4, sigmas=custom, guidance_scale=0.0)
    shifted = [3 * s / (1 + 2 * s) for s in custom] + [0.0]
    got = sample_text_to_image(denoiser, positive, noise, sigmas=shifted)
    assert rel_err(got, expected) <= TOL


# --- img2img -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae():
    return build_flux_vae(seed=1)


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
def test_img2img_matches_pipeline(transformer, denoiser, vae, strength):
    pipe = img2img_pipeline(transformer, vae)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand((1, 3, 16, 16), generator=torch.Generator().manual_seed(20))
    positive = caption_feats([8], seed=6)
    expected = pipe(
        image=image,
        strength=strength,
        prompt_embeds=positive,
        num_inference_steps=8,
        guidance_scale=0.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(21),
    ).images
    z0, noise = img2img_inputs_like_pipeline(pipe, image, seed=21)
    assert z0.shape == (1, *LATENT)
    counting = CountingDenoiser(denoiser)
    got = sample_img2img(counting, positive, z0, noise, strength=strength)
    err = rel_err(got, expected)
    print(f"img2img strength {strength}: rel err {err:.2e}")
    assert err <= TOL
    assert len(counting.calls) == img2img_sigmas(8, strength).numel() - 1
    # The first call sees σ_s of the trained grid.
    assert counting.calls[0][2][0].item() == img2img_sigmas(8, strength)[0].item()


def test_img2img_cfg_matches_pipeline(transformer, denoiser, vae):
    pipe = img2img_pipeline(transformer, vae)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand((1, 3, 16, 16), generator=torch.Generator().manual_seed(22))
    positive = caption_feats([8, 10], seed=7)
    negative = caption_feats([4, 4], seed=8)
    expected = pipe(
        image=image,
        strength=0.6,
        prompt_embeds=positive,
        negative_prompt_embeds=negative,
        num_inference_steps=8,
        guidance_scale=1.5,
        cfg_truncation=0.6,
        output_type="latent",
        generator=torch.Generator().manual_seed(23),
    ).images
    z0, noise = img2img_inputs_like_pipeline(pipe, image, seed=23, batch=2)
    got = sample_img2img(
        denoiser, positive, z0[:1], noise, strength=0.6, guidance=1.5, negative=negative, cfg_truncation=0.6
    )
    err = rel_err(got, expected)
    print(f"img2img cfg: rel err {err:.2e}")
    assert err <= TOL


def test_img2img_strength_zero_returns_source_without_model_call():
    source = torch.randn(2, *LATENT)

    def must_not_run(x, sigma, cap_feats):
        raise AssertionError("model called at strength 0")

    out = sample_img2img(must_not_run, [torch.randn(3, 32)], source, torch.randn(2, *LATENT), strength=0.0)
    assert torch.equal(out, source)


def test_euler_with_exact_velocity_lands_on_target():
    # Independent of diffusers: with the true velocity, each denoised preview is x0 and Euler ends on x0.
    x0 = torch.randn(2, *LATENT)
    noise = make_noise((2, *LATENT), 3)
    seen = []
    out = sample_text_to_image(
        OracleDenoiser(x0), [torch.randn(2, 32)], noise, callback=lambda i, n, x, d: seen.append((i, n, x, d))
    )
    assert rel_err(out, x0) < 1e-5
    assert [(i, n) for i, n, _, _ in seen] == [(i, 8) for i in range(8)]
    for _, _, _, denoised in seen:
        assert rel_err(denoised, x0) < 1e-5
    for k, (_, _, x, _) in enumerate(seen[:-1]):
        s = flow_sigmas(8)[k + 1].item()
        assert rel_err(x, s * noise + (1 - s) * x0) < 1e-5
    assert torch.equal(seen[-1][2], out)


# --- callbacks, errors -------------------------------------------------------------------------------------


def test_callback_per_step_for_img2img(denoiser):
    calls = []
    source, noise = torch.randn(1, *LATENT), make_noise((1, *LATENT), 4)
    out = sample_img2img(
        denoiser, [torch.randn(5, 32)], source, noise, strength=0.6, callback=lambda *a: calls.append(a)
    )
    assert [(i, n) for i, n, _, _ in calls] == [(i, 5) for i in range(5)]
    assert torch.equal(calls[-1][2], out)


def test_exception_in_callback_aborts_sampling(denoiser):
    counting = CountingDenoiser(denoiser)

    class Cancelled(Exception):
        pass

    def cancel_at_step_2(i, total, x, denoised):
        if i == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        sample_text_to_image(
            counting, [torch.randn(5, 32)], make_noise((1, *LATENT), 0), callback=cancel_at_step_2
        )
    assert len(counting.calls) == 3


class NaNAtStep:
    device = torch.device("cpu")

    def __init__(self, bad_call: int, dtype: torch.dtype = torch.bfloat16) -> None:
        self.bad_call = bad_call
        self.dtype = dtype
        self.n = 0

    def __call__(self, x, sigma, cap_feats):
        self.n += 1
        v = torch.zeros_like(x)
        return v.fill_(float("nan")) if self.n == self.bad_call else v


@pytest.mark.parametrize("check_each_step", [True, False], ids=["per-step", "deferred"])
def test_non_finite_latents_raise_sampling_error(monkeypatch, check_each_step):
    monkeypatch.setattr(sampling_mod, "_check_each_step", lambda device: check_each_step)
    model = NaNAtStep(bad_call=3)
    with pytest.raises(SamplingError, match=r"step 3 of 8.*bfloat16") as info:
        sample_text_to_image(model, [torch.randn(5, 32)], make_noise((1, *LATENT), 0))
    assert "bfloat16 rarely overflows" in str(info.value) and "NaN/inf weights" in str(info.value)
    assert model.n == (3 if check_each_step else 8)


def test_fp16_non_finite_error_says_use_bf16():
    with pytest.raises(SamplingError, match=r"step 1 of 4 with the model in float16.*bfloat16 \(bf16\)"):
        sample_text_to_image(
            NaNAtStep(1, torch.float16), [torch.randn(5, 32)], torch.randn(1, *LATENT), steps=4
        )


def test_model_runs_in_its_dtype_and_latents_stay_float32(denoiser):
    class Bf16Denoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.bfloat16))
            self.seen: list[torch.dtype] = []

        def forward(self, x, sigma, cap_feats):
            self.seen.append(x.dtype)
            assert all(c.dtype == torch.bfloat16 for c in cap_feats)
            return x * self.scale * 0.5

    model = Bf16Denoiser()
    out = sample_text_to_image(model, [torch.randn(5, 32)], torch.randn(1, *LATENT), steps=3)
    assert model.seen == [torch.bfloat16] * 3 and out.dtype == torch.float32


def test_model_placement_of_fp8_storage_is_bf16():
    class Fp8(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float8_e4m3fn), requires_grad=False)

    assert sampling_mod.model_placement(Fp8()) == (torch.device("cpu"), torch.bfloat16)
    assert sampling_mod.model_placement(lambda *a: None, "cpu") == (torch.device("cpu"), torch.float32)


def test_increasing_sigmas_are_refused(denoiser):
    noise = torch.randn(1, *LATENT)
    pos = caption_feats([5], seed=0)
    with pytest.raises(ValueError, match=r"sigmas must not increase.*sigma 2 = 1 is above sigma 1 = 0.5"):
        sample_text_to_image(denoiser, pos, noise, sigmas=[1.0, 0.5, 1.0, 0.0])
    with pytest.raises(ValueError, match="sigmas must not increase"):
        sampling_mod.sample_euler(denoiser, pos, noise, [0.0, 1.0])


def test_int_latents_are_refused(denoiser):
    pos = caption_feats([5], seed=0)
    with pytest.raises(ValueError, match="noise must be a float tensor"):
        sample_text_to_image(denoiser, pos, torch.zeros(1, *LATENT, dtype=torch.int32))


def test_input_validation(denoiser):
    noise = torch.randn(2, *LATENT)
    pos = caption_feats([5, 6, 7], seed=0)
    with pytest.raises(ValueError, match="positive has 3 entries for a batch of 2"):
        sample_text_to_image(denoiser, pos, noise)
    with pytest.raises(ValueError, match="needs `negative`"):
        sample_text_to_image(denoiser, pos[:1], noise, guidance=2.0)
    with pytest.raises(ValueError, match="guidance must be a finite number >= 0"):
        sample_text_to_image(denoiser, pos[:1], noise, guidance=-1.0)
    with pytest.raises(ValueError, match=r"noise must be a float tensor \(B, 16, H/8, W/8\)"):
        sample_text_to_image(denoiser, pos[:1], noise[0])
    with pytest.raises(ValueError, match="positive must be a list"):
        sample_text_to_image(denoiser, pos[0], noise)
    with pytest.raises(ValueError, match="steps must be a whole number >= 1"):
        sample_text_to_image(denoiser, pos[:1], noise, steps=0)
    with pytest.raises(ValueError, match="strength must be between 0.0 and 1.0"):
        sample_img2img(denoiser, pos[:1], noise, noise, strength=1.5)
    with pytest.raises(ValueError, match="must have the same shape"):
        sample_img2img(denoiser, pos[:1], torch.randn(1, 16, 4, 4), noise, strength=0.5)
