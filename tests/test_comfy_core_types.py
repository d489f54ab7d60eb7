"""Our loaders return ComfyUI's core MODEL, CLIP and VAE, and core nodes work on them as on native models."""

from __future__ import annotations

import pytest
import torch

from tests.comfy_harness import DEMO_LORA, comfy, comfy_module
from zimage_core.demo_weights import DEMO_FILES


@pytest.fixture(scope="module")
def pack():
    comfy()
    nodes = comfy_module("nodes")
    ours = nodes.NODE_CLASS_MAPPINGS
    model = ours["ZImageModelLoader"]().load(DEMO_FILES["diffusion_models"], "default")[0]
    clip = ours["ZImageTextEncoderLoader"]().load(DEMO_FILES["text_encoders"])[0]
    vae = ours["ZImageVAELoader"]().load(DEMO_FILES["vae"])[0]
    return nodes, model, clip, vae


def _latent(nodes, w=48, h=32, batch=1):
    return nodes.NODE_CLASS_MAPPINGS["ZImageEmptyLatent"]().generate(w, h, "custom", batch)[0]


# KSampler's "simple" schedule reads ComfyUI's 1000-entry sigma table: it equals Turbo's exact schedule when
# 1000 is a multiple of the step count (8, the default, or 4 here).
STEPS = 4


def _turbo(nodes, model, cond, latent, seed=5, steps=STEPS):
    return nodes.NODE_CLASS_MAPPINGS["ZImageTurboSampler"]().sample(model, cond, latent, seed, steps, 3.0, 0.0)[0]


def test_loaders_return_core_types(pack):
    nodes, model, clip, vae = pack
    model_patcher = comfy_module("comfy.model_patcher")
    assert isinstance(model, model_patcher.ModelPatcher)
    assert isinstance(model.model, comfy_module("comfy.model_base").Lumina2)  # ComfyUI's Z-Image family
    assert type(model.model.latent_format).__name__ == "Flux"
    assert model.model.model_sampling.shift == pytest.approx(3.0)
    # The state dict under diffusion_model. has ComfyUI's native Z-Image names (what LoRA loaders patch).
    keys = set(model.model.state_dict())
    assert {"diffusion_model.layers.0.attention.qkv.weight", "diffusion_model.x_pad_token",
            "diffusion_model.final_layer.adaLN_modulation.1.weight"} <= keys
    assert isinstance(clip, comfy_module("comfy.sd").CLIP)
    assert isinstance(vae, comfy_module("comfy.sd").VAE)
    for kind, node in (("MODEL", "ZImageModelLoader"), ("CLIP", "ZImageTextEncoderLoader"), ("VAE", "ZImageVAELoader")):
        assert nodes.NODE_CLASS_MAPPINGS[node].RETURN_TYPES == (kind,)


def test_clip_text_encode_on_our_clip_gives_zimage_text_encode_output(pack):
    nodes, _, clip, _ = pack
    text = "a lighthouse at dusk, oil painting, 灯塔"
    (core,) = nodes.CLIPTextEncode().encode(clip, text)
    (ours,) = nodes.NODE_CLASS_MAPPINGS["ZImageTextEncode"]().encode(clip, text)
    assert len(core) == len(ours) == 1
    torch.testing.assert_close(core[0][0], ours[0][0], rtol=0, atol=0)
    assert torch.equal(core[0][1]["attention_mask"], ours[0][1]["attention_mask"])
    # The features are zimage_core's (chat template, second-to-last layer, no padding).
    (direct,) = clip.cond_stage_model.encoder.encode([text])
    torch.testing.assert_close(core[0][0][0], direct.float(), rtol=0, atol=0)


def test_vae_decode_tiled_and_encode_for_inpaint_run_on_our_vae(pack):
    nodes, _, _, vae = pack
    raw = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    (whole,) = nodes.VAEDecode().decode(vae, {"samples": raw})
    (tiled,) = nodes.VAEDecodeTiled().decode(vae, {"samples": raw}, 64, 16, 64, 8)
    assert whole.shape == tiled.shape == (1, 128, 128, 3) and torch.isfinite(tiled).all()
    # Tiles of 64 px see less context than the whole image; on random weights they still agree roughly.
    assert float((whole - tiled).abs().mean()) < 0.25 and float(tiled.std()) > 0.01
    (ours,) = nodes.NODE_CLASS_MAPPINGS["ZImageVAEDecode"]().decode(vae, {"samples": raw})
    assert float((ours - whole).abs().max()) < 1e-4  # the same network either way
    mask = torch.zeros(1, 128, 128)
    mask[:, :, 64:] = 1.0
    (inpaint,) = nodes.VAEEncodeForInpaint().encode(vae, whole, mask, 0)
    assert inpaint["samples"].shape == (1, 16, 16, 16) and inpaint["noise_mask"].shape[-2:] == (128, 128)


def test_sampler_honours_the_latent_noise_mask_like_ksampler(pack):
    nodes, model, clip, _ = pack
    (cond,) = nodes.CLIPTextEncode().encode(clip, "a red fox")
    source = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1.0  # inpaint the right half only
    (masked,) = nodes.SetLatentNoiseMask().set_mask({"samples": source}, mask)
    out = _turbo(nodes, model, cond, masked)["samples"]
    expected = nodes.KSampler().sample(model, 5, STEPS, 1.0, "euler", "simple", cond, cond, masked, 1.0)[0]["samples"]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[..., :4], source[..., :4], rtol=1e-4, atol=1e-4)  # kept as it was
    assert (out[..., 4:] - source[..., 4:]).abs().mean() > 0.1  # resampled


def test_core_conditioning_semantics_apply(pack):
    """ConditioningSetTimestepRange and ConditioningCombine mean what they mean for KSampler."""
    nodes, model, clip, _ = pack
    (a,) = nodes.CLIPTextEncode().encode(clip, "a red fox")
    (b,) = nodes.CLIPTextEncode().encode(clip, "a blue whale in the deep sea")
    latent = _latent(nodes)
    plain = _turbo(nodes, model, a, latent)["samples"]
    (late,) = nodes.ConditioningSetTimestepRange().set_range(b, 0.5, 1.0)
    (early,) = nodes.ConditioningSetTimestepRange().set_range(a, 0.0, 0.5)
    (switched,) = nodes.ConditioningCombine().combine(early, late)
    mixed = _turbo(nodes, model, switched, latent)["samples"]
    expected = nodes.KSampler().sample(model, 5, STEPS, 1.0, "euler", "simple", switched, switched, latent,
                                       1.0)[0]["samples"]
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
    assert (mixed - plain).abs().mean() > 1e-3  # the range is honoured, not ignored


def test_two_branches_from_one_loader_stay_independent(pack):
    nodes, model, clip, _ = pack
    (cond,) = nodes.CLIPTextEncode().encode(clip, "a red fox")
    latent = _latent(nodes)
    before = _turbo(nodes, model, cond, latent)["samples"]
    (with_lora,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, DEMO_LORA, 1.0)
    lora_out = _turbo(nodes, with_lora, cond, latent)["samples"]
    assert (lora_out - before).abs().mean() > 1e-3
    assert torch.equal(_turbo(nodes, model, cond, latent)["samples"], before)


def test_block_patches_and_rope_options_reach_our_transformer(pack):
    """Community model patches (e.g. ZImageFunControlnet's) get NextDiT's arguments, and their in-place
    edits and ComfyUI's rope options take effect."""
    nodes, model, clip, _ = pack
    (cond,) = nodes.CLIPTextEncode().encode(clip, "a red fox")
    latent = _latent(nodes)
    before = _turbo(nodes, model, cond, latent, steps=1)["samples"]
    seen = []

    def double_block(args):
        seen.append((args["block_index"], tuple(args["img"].shape), tuple(args["pe"].shape[:2])))
        args["img"] += 0.5  # in place, as ZImageControlPatch does
        return args

    patched = model.clone()
    patched.set_model_double_block_patch(double_block)
    out = _turbo(nodes, patched, cond, latent, steps=1)["samples"]
    layers = len(model.model.diffusion_model.layers)
    dim = model.model.diffusion_model.config.dim
    # 48x32 pixels → 3x2 tokens, padded to 32; one call per main block.
    assert seen == [(i, (1, 32, dim), (1, 32)) for i in range(layers)]
    assert (out - before).abs().mean() > 1e-3
    roped = model.clone()
    if not hasattr(roped, "set_model_rope_options"):
        pytest.skip("this ComfyUI has no rope options")
    roped.set_model_rope_options(scale_x=2.0, shift_x=0.0, scale_y=1.0, shift_y=0.0, scale_t=1.0, shift_t=0.0)
    assert (_turbo(nodes, roped, cond, latent, steps=1)["samples"] - before).abs().mean() > 1e-4
    assert torch.equal(_turbo(nodes, model, cond, latent, steps=1)["samples"], before)
