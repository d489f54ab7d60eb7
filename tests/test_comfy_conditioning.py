"""CONDITIONING in ComfyUI's native Z-Image layout, so conditioning from core CLIPTextEncode (ComfyUI's own
Qwen3-4B encoder) and ours are interchangeable."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.comfy_harness import comfy_module
from zimage_core.demo_weights import DEMO_FILES


@pytest.fixture(scope="module")
def pack():
    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    model = nodes["ZImageModelLoader"]().load(DEMO_FILES["diffusion_models"], "default")[0]
    encoder = nodes["ZImageTextEncoderLoader"]().load(DEMO_FILES["text_encoders"])[0]
    return nodes, model, encoder


def test_text_encode_output_has_comfyui_native_layout(pack):
    nodes, _, encoder = pack
    (cond,) = nodes["ZImageTextEncode"]().encode(encoder, "a cat on a mat")
    assert isinstance(cond, list) and len(cond) == 1
    tensor, extra = cond[0]
    # comfy/text_encoders/z_image.py: (1, L, hidden) features, pooled_output None, a (1, L) attention_mask.
    assert tensor.ndim == 3 and tensor.shape[0] == 1 and tensor.dtype == torch.float32
    assert extra["pooled_output"] is None
    assert extra["attention_mask"].shape == tensor.shape[:2] and bool(extra["attention_mask"].all())


def test_sampler_drops_padding_marked_by_the_attention_mask(pack):
    """ComfyUI pads batched prompts and marks real tokens in attention_mask; padding must not reach the DiT."""
    nodes, model, encoder = pack
    (cond,) = nodes["ZImageTextEncode"]().encode(encoder, "a lighthouse at dusk")
    tensor, extra = cond[0]
    padded = torch.cat([tensor, torch.randn(1, 7, tensor.shape[-1])], 1)
    mask = torch.cat([extra["attention_mask"], torch.zeros(1, 7, dtype=torch.long)], 1)
    padded_cond = [[padded, {"pooled_output": None, "attention_mask": mask}]]
    (latent,) = nodes["ZImageEmptyLatent"]().generate(32, 32, "custom", 1)
    sampler = nodes["ZImageTurboSampler"]()
    a = sampler.sample(model, cond, latent, 5, 4, 3.0, 0.0)[0]["samples"]
    b = sampler.sample(model, padded_cond, latent, 5, 4, 3.0, 0.0)[0]["samples"]
    assert torch.equal(a, b)


def test_conditioning_from_another_text_encoder_is_refused_clearly(pack):
    nodes, model, _ = pack
    clip_l_like = [[torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 768)}]]
    (latent,) = nodes["ZImageEmptyLatent"]().generate(32, 32, "custom", 1)
    with pytest.raises(ValueError, match="width 768.*expects width 32"):
        nodes["ZImageTurboSampler"]().sample(model, clip_l_like, latent, 0, 1, 3.0, 0.0)


def test_empty_latent_presets_and_raw_latent_convention(pack):
    nodes, _, _ = pack
    (latent,) = nodes["ZImageEmptyLatent"]().generate(64, 64, "832x1248 (2:3)", 2)
    assert latent["samples"].shape == (2, 16, 1248 // 8, 832 // 8)
    # Same convention as ComfyUI's EmptySD3LatentImage for Flux-family models: zeros in raw VAE space.
    assert not latent["samples"].any()
    module = sys.modules[nodes["ZImageEmptyLatent"].__module__]
    assert set(module.PRESETS) >= {"1024x1024 (1:1)", "1280x720 (16:9)", "576x1344 (9:21)"}
