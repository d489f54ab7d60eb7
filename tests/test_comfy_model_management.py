"""Our models under ComfyUI's model management (ModelPatcher), exercised on the CPU."""

from __future__ import annotations

import torch

from tests.comfy_harness import comfy_module
from zimage_core.demo_weights import DEMO_FILES


def _model():
    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    return nodes["ZImageModelLoader"]().load(DEMO_FILES["diffusion_models"], "default")[0]


def _velocity(patcher, x, sigma, context):
    """One call of the diffusion model the way ComfyUI's model_base calls NextDiT."""
    dm = patcher.model.diffusion_model
    return dm(x, sigma, context, context.shape[1], transformer_options={})


def test_lowvram_streaming_gives_the_same_output():
    """--lowvram: ModelPatcher leaves weights offloaded and switches comfy.ops layers to per-call casting
    (with a 1-byte budget, every layer streams). The transformer must produce the same velocity."""
    patcher = _model()
    g = torch.Generator().manual_seed(0)
    x, sigma, context = torch.randn(1, 16, 4, 6, generator=g), torch.tensor([0.6]), torch.randn(1, 11, 32, generator=g)
    reference = _velocity(patcher, x, sigma, context)
    cpu = torch.device("cpu")
    patcher.patch_model(device_to=cpu, lowvram_model_memory=1)
    try:
        assert patcher.model.model_lowvram
        streamed = [m for m in patcher.model.diffusion_model.modules() if getattr(m, "comfy_cast_weights", False)]
        assert len(streamed) >= 10
        assert torch.equal(_velocity(patcher, x, sigma, context), reference)
    finally:
        patcher.unpatch_model(device_to=cpu)


def test_models_report_sizes_and_memory_estimates_to_comfyui():
    patcher = _model()
    weights = sum(t.numel() * t.element_size() for t in patcher.model.state_dict().values())
    assert patcher.model_size() == weights  # what ComfyUI budgets for the weights (and the sigma table)
    model = patcher.model
    small = model.memory_required((1, 16, 64, 64))
    assert model.memory_required((1, 16, 128, 128)) > small  # activations grow with the image
    assert model.memory_required((2, 16, 64, 64)) > small  # and with the batch (CFG doubles it)


def test_vae_lowvram_streaming_gives_the_same_image():
    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    vae = nodes["ZImageVAELoader"]().load(DEMO_FILES["vae"])[0]
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    reference = vae.decode(latents)
    cpu = torch.device("cpu")
    vae.patcher.patch_model(device_to=cpu, lowvram_model_memory=1)
    try:
        assert any(getattr(m, "comfy_cast_weights", False) for m in vae.first_stage_model.modules())
        assert torch.equal(vae.first_stage_model.decode(latents), vae.first_stage_model.decode(latents))
        assert torch.equal(vae.decode(latents), reference)
    finally:
        vae.patcher.unpatch_model(device_to=cpu)


def test_text_encoder_splits_across_devices_like_comfyui_encoders():
    """ComfyUI can only split models whose layers are comfy.ops classes: ours are, so a partly loaded text
    encoder (small cards, default mode) streams its remaining layers instead of failing on a device mismatch."""
    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    clip = nodes["ZImageTextEncoderLoader"]().load(DEMO_FILES["text_encoders"])[0]
    tokens = clip.tokenize("a red fox in the snow")
    reference = clip.cond_stage_model.encode_token_weights(tokens)[0]
    cpu = torch.device("cpu")
    clip.patcher.patch_model(device_to=cpu, lowvram_model_memory=1)
    try:
        streamed = [m for m in clip.cond_stage_model.modules() if getattr(m, "comfy_cast_weights", False)]
        assert len(streamed) >= 7  # q/k/v/o + MLP projections of each layer, and the embedding
        assert torch.equal(clip.cond_stage_model.encode_token_weights(tokens)[0], reference)
    finally:
        clip.patcher.unpatch_model(device_to=cpu)
