"""What other ComfyUI nodes plug into a model reaches ours: attention overrides and step caches.

- An attention override (`transformer_options["optimized_attention_override"]`, how attention-backend
  nodes such as SageAttention patchers install themselves on a cloned MODEL) is called by our blocks.
- ComfyUI's EasyCache (a DIFFUSION_MODEL wrapper) and LazyCache (a PREDICT_NOISE wrapper) skip transformer
  calls on our MODEL as on any model.
"""

from __future__ import annotations

import pytest
import torch

from tests.comfy_harness import comfy, comfy_module
from zimage_core.demo_weights import DEMO_FILES

STEPS = 8


@pytest.fixture(scope="module")
def demo():
    comfy()
    nodes = comfy_module("nodes")
    model = nodes.NODE_CLASS_MAPPINGS["ZImageModelLoader"]().load(DEMO_FILES["diffusion_models"], "default")[0]
    clip = nodes.NODE_CLASS_MAPPINGS["ZImageTextEncoderLoader"]().load(DEMO_FILES["text_encoders"])[0]
    cond = nodes.CLIPTextEncode().encode(clip, "a lighthouse at dusk")[0]
    latent = nodes.NODE_CLASS_MAPPINGS["ZImageEmptyLatent"]().generate(64, 48, "custom", 1)[0]
    return nodes, model, cond, latent


def _sample(nodes, model, cond, latent, steps: int = 2) -> torch.Tensor:
    return nodes.KSampler().sample(model, 5, steps, 1.0, "euler", "simple", cond, cond, latent, 1.0)[0]["samples"]


def _counting(model):
    """Count the transformer's evaluations: calls of its first main block (DIFFUSION_MODEL wrappers such as
    EasyCache's run inside the module's forward, so they decide before the blocks run)."""
    calls = []
    handle = model.model.diffusion_model.layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


def test_an_attention_override_installed_by_a_node_runs_our_attention(demo):
    nodes, model, cond, latent = demo
    seen = []

    def override(func, q, k, v, heads, *args, **kwargs):
        seen.append((tuple(q.shape), heads, kwargs.get("skip_reshape")))
        return func(q, k, v, heads, *args, **kwargs)

    def zeros(func, q, k, v, heads, *args, **kwargs):
        out = func(q, k, v, heads, *args, **kwargs)
        return torch.zeros_like(out)

    def patched(fn):  # what an attention node does: clone, then set the override on the clone
        m = model.clone()
        m.model_options["transformer_options"]["optimized_attention_override"] = fn
        return m

    plain = _sample(nodes, model, cond, latent)
    routed = _sample(nodes, patched(override), cond, latent)
    cfg = model.model.diffusion_model.config
    blocks = 2 * cfg.n_refiner_layers + cfg.n_layers
    assert len(seen) == 2 * blocks  # every block's attention, at both steps
    assert {(s[0][1], s[1], s[2]) for s in seen} == {(cfg.n_heads, cfg.n_heads, True)}  # (B, H, N, D) layout
    torch.testing.assert_close(routed, plain, rtol=1e-5, atol=1e-5)  # ComfyUI's attention = our SDPA
    assert not torch.allclose(_sample(nodes, patched(zeros), cond, latent), plain, atol=1e-3)
    # The override stays on the clone: the model it was given is untouched.
    assert "optimized_attention_override" not in model.model_options["transformer_options"]


@pytest.mark.parametrize("cache", ["EasyCache", "LazyCache"])
def test_comfyui_step_caches_skip_transformer_calls_on_our_model(demo, cache):
    nodes, model, cond, latent = demo
    node = nodes.NODE_CLASS_MAPPINGS.get(cache)
    if node is None:
        pytest.skip(f"this ComfyUI has no {cache}")
    cached = node.execute(model, reuse_threshold=3.0, start_percent=0.0, end_percent=1.0, verbose=False)[0]
    counts = {}
    outputs = {}
    for name, m in (("plain", model), ("cached", cached)):
        calls, handle = _counting(m)
        try:
            outputs[name] = _sample(nodes, m, cond, latent, STEPS)
        finally:
            handle.remove()
        counts[name] = len(calls)
    assert counts["plain"] == STEPS
    assert 0 < counts["cached"] < counts["plain"], counts
    assert torch.isfinite(outputs["cached"]).all()
