"""Our models under ComfyUI's model management (ModelPatcher), exercised on the CPU."""

from __future__ import annotations

import torch

from tests.comfy_harness import comfy_module
from zimage_core.demo_weights import DEMO_FILES


def _model():
    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    return nodes["ZImageModelLoader"]().load(DEMO_FILES["diffusion_models"], "default")[0]


def test_lowvram_streaming_gives_the_same_output():
    """--lowvram: ModelPatcher leaves weights offloaded and switches comfy.ops layers to per-call casting
    (with a 1-byte budget, every layer streams). The transformer must produce the same velocity."""
    model = _model()
    denoiser = model.denoiser()
    g = torch.Generator().manual_seed(0)
    x, sigma, caps = torch.randn(1, 16, 4, 6, generator=g), torch.tensor([0.6]), [torch.randn(11, 32, generator=g)]
    reference = denoiser(x, sigma, caps)
    cpu = torch.device("cpu")
    model.patcher.patch_model(device_to=cpu, lowvram_model_memory=1)
    try:
        assert model.patcher.model.model_lowvram
        streamed = [m for m in model.module.modules() if getattr(m, "comfy_cast_weights", False)]
        assert len(streamed) >= 10
        assert torch.equal(denoiser(x, sigma, caps), reference)
    finally:
        model.patcher.unpatch_model(device_to=cpu)


def test_models_report_sizes_and_memory_estimates_to_comfyui():
    model = _model()
    params = sum(p.numel() * p.element_size() for p in model.module.parameters())
    assert model.patcher.model_size() == params  # what ComfyUI budgets for the weights
    small = model.memory_estimate((1, 16, 64, 64), 64)
    assert model.memory_estimate((1, 16, 128, 128), 64) > small  # activations grow with the image
    assert model.memory_estimate((2, 16, 64, 64), 64) > small  # and with the batch
    assert model.memory_estimate((1, 16, 64, 64), 64, passes=2) > small  # and with CFG's second pass


def test_vae_lowvram_streaming_gives_the_same_image():
    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    vae = nodes["ZImageVAELoader"]().load(DEMO_FILES["vae"])[0]
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    reference = vae.vae.decode(latents)
    cpu = torch.device("cpu")
    vae.patcher.patch_model(device_to=cpu, lowvram_model_memory=1)
    try:
        assert any(getattr(m, "comfy_cast_weights", False) for m in vae.vae.modules())
        assert torch.equal(vae.vae.decode(latents), reference)
    finally:
        vae.patcher.unpatch_model(device_to=cpu)
