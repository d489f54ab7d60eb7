"""Inpainting in zimage_core against diffusers' ZImageInpaintPipeline (fp32, CPU, random tiny weights)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, ZImageInpaintPipeline

from tests.sampling_fixtures import (
    LATENT_CHANNELS,
    _randomize,
    build_diffusers_transformer,
    caption_feats,
    make_denoiser,
    rel_err,
    zimage_scheduler,
)
from zimage_core import sample_img2img, sample_inpaint
from zimage_core.sampling import img2img_sigmas, latent_inpaint_mask

TOL = 1e-5
PIXELS = 64  # a 64×64 image → an 8×8 latent (4×4 patches of 16 px)


@pytest.fixture(scope="module")
def transformer():
    return build_diffusers_transformer(seed=0)


@pytest.fixture(scope="module")
def denoiser(transformer, tmp_path_factory):
    return make_denoiser(transformer, tmp_path_factory.mktemp("inpaint-denoiser"))


@pytest.fixture(scope="module")
def vae():
    """A tiny FLUX-layout VAE with FLUX's 8× downsampling (four blocks), so the 16-px patch grid is real."""
    model = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=LATENT_CHANNELS,
        norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    _randomize(model, 1, std=0.05)
    return model.eval()


def _pipeline(transformer, vae) -> ZImageInpaintPipeline:
    pipe = ZImageInpaintPipeline(
        scheduler=zimage_scheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unaligned_mask() -> torch.Tensor:
    """A pixel mask whose edges fall inside 16-px patches and 8-px latent cells, with soft values on both
    sides of diffusers' 0.5 threshold."""
    m = torch.zeros(1, 1, PIXELS, PIXELS)
    m[..., 13:46, 7:37] = 1.0
    m[..., 13:46, 37:51] = 0.62  # kept as 1 by the threshold
    m[..., 46:58, 7:51] = 0.38  # dropped to 0
    return m


def _run_reference(pipe, image, mask, strength, seed, **kwargs):
    """The pipeline's latent result, with the latents, noise and latent mask it used (recorded, not rebuilt)."""
    seen = {}
    prepare_latents, prepare_mask = pipe.prepare_latents, pipe.prepare_mask_latents

    def record_latents(*args, **kw):
        seen["start"], seen["noise"], seen["source"] = out = prepare_latents(*args, **kw)
        return out

    def record_mask(*args, **kw):
        out = prepare_mask(*args, **kw)
        seen["mask"] = out[0]
        return out

    pipe.prepare_latents, pipe.prepare_mask_latents = record_latents, record_mask
    try:
        result = pipe(image=image, mask_image=mask, strength=strength, num_inference_steps=8,
                      output_type="latent", generator=torch.Generator().manual_seed(seed), **kwargs).images
    finally:
        del pipe.prepare_latents, pipe.prepare_mask_latents
    return result, seen


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.8, 1.0])
def test_inpaint_matches_pipeline_with_a_mask_off_the_patch_grid(transformer, denoiser, vae, strength):
    pipe = _pipeline(transformer, vae)
    image = torch.rand((1, 3, PIXELS, PIXELS), generator=torch.Generator().manual_seed(30))
    mask = _unaligned_mask()
    positive = caption_feats([8], seed=9)
    expected, seen = _run_reference(pipe, image, mask, strength, seed=31, prompt_embeds=positive,
                                    guidance_scale=0.0)
    latent_mask = latent_inpaint_mask(mask, seen["source"].shape[-2:])
    assert torch.equal(latent_mask, seen["mask"]), "the latent mask differs from the pipeline's"
    assert 0 < latent_mask.mean() < 1
    calls = []

    def counting(x, sigma, cap_feats):
        calls.append(sigma[0].item())
        return denoiser(x, sigma, cap_feats)

    counting.dtype, counting.device = denoiser.dtype, denoiser.device
    got = sample_inpaint(counting, positive, seen["source"], seen["noise"], latent_mask, strength=strength)
    err = rel_err(got, expected)
    print(f"inpaint strength {strength}: rel err {err:.2e}")
    assert err <= TOL
    assert calls == img2img_sigmas(8, strength)[:-1].tolist()
    # Where the mask is 0 the result is the source itself.
    keep = (latent_mask == 0).expand_as(got)
    assert torch.equal(got[keep], seen["source"].expand_as(got)[keep])
    assert (got - seen["source"]).abs()[~keep].mean() > 1e-2


def test_inpaint_with_cfg_and_a_batch_matches_pipeline(transformer, denoiser, vae):
    pipe = _pipeline(transformer, vae)
    image = torch.rand((1, 3, PIXELS, PIXELS), generator=torch.Generator().manual_seed(32))
    mask = _unaligned_mask()
    positive = caption_feats([8, 11], seed=10)
    negative = caption_feats([4, 5], seed=11)
    expected, seen = _run_reference(pipe, image, mask, 0.7, seed=33, prompt_embeds=positive,
                                    negative_prompt_embeds=negative, guidance_scale=1.5, cfg_truncation=0.6)
    got = sample_inpaint(denoiser, positive, seen["source"][:1], seen["noise"],
                         latent_inpaint_mask(mask, (8, 8)), strength=0.7, guidance=1.5, negative=negative,
                         cfg_truncation=0.6)
    err = rel_err(got, expected)
    print(f"inpaint cfg: rel err {err:.2e}")
    assert err <= TOL


def test_all_one_mask_is_plain_img2img(denoiser):
    source = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    positive = caption_feats([6], seed=3)
    full = torch.ones(1, 1, 8, 8)
    for strength in (0.5, 1.0):
        inpainted = sample_inpaint(denoiser, positive, source, noise, full, strength=strength)
        plain = sample_img2img(denoiser, positive, source, noise, strength=strength)
        assert torch.equal(inpainted, plain)


def test_all_zero_mask_returns_the_source_without_calling_the_model():
    def must_not_run(x, sigma, cap_feats):
        raise AssertionError("the model was called")

    source = torch.randn(1, 16, 8, 8)
    out = sample_inpaint(must_not_run, [torch.randn(3, 32)], source, torch.randn(2, 16, 8, 8),
                         torch.zeros(1, 1, 8, 8), strength=1.0)
    assert out.shape == (2, 16, 8, 8) and torch.equal(out, source.expand(2, -1, -1, -1))


def test_soft_mask_blends_linearly(denoiser):
    """A soft mask m gives (1 − m)·kept + m·repainted at every step, as the pipeline's blend formula: with
    the same value everywhere, the result lies between the source and the full repaint."""
    source = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(6))
    positive = caption_feats([6], seed=7)
    half = sample_inpaint(denoiser, positive, source, noise, torch.full((1, 1, 8, 8), 0.5), strength=1.0)
    full = sample_inpaint(denoiser, positive, source, noise, torch.ones(1, 1, 8, 8), strength=1.0)
    d_half, d_full = (half - source).norm(), (full - source).norm()
    assert 0 < d_half < d_full


@pytest.mark.parametrize("bad", [torch.ones(1, 8, 8), torch.ones(1, 1, 16, 16), torch.ones(3, 1, 8, 8),
                                 torch.full((1, 1, 8, 8), 2.0), torch.full((1, 1, 8, 8), float("nan"))])
def test_bad_masks_are_refused_with_the_expected_shape(bad):
    with pytest.raises(ValueError, match="mask"):
        sample_inpaint(lambda *a: None, [torch.randn(3, 32)], torch.randn(1, 16, 8, 8), torch.randn(2, 16, 8, 8),
                       bad)


def test_latent_inpaint_mask_shapes_and_errors():
    m = torch.zeros(2, 64, 48)
    m[:, 20:40, 10:30] = 0.7
    out = latent_inpaint_mask(m, (8, 6))
    assert out.shape == (2, 1, 8, 6) and set(out.unique().tolist()) == {0.0, 1.0}
    soft = latent_inpaint_mask(torch.full((16, 16), 0.3), (2, 2), binarize=False)
    assert torch.allclose(soft, torch.full((1, 1, 2, 2), 0.3))
    with pytest.raises(ValueError, match="mask must be"):
        latent_inpaint_mask(torch.zeros(1, 3, 8, 8), (1, 1))
    with pytest.raises(ValueError, match="latent_size"):
        latent_inpaint_mask(torch.zeros(8, 8), (0, 1))
