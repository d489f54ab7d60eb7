"""The opt-in speed paths as ComfyUI users reach them: fp8 matmul weights and the compile node."""

from __future__ import annotations

import torch

from tests.comfy_harness import comfy_module
from zimage_core.demo_weights import DEMO_FILES


def _load(weight_dtype: str):
    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    return nodes["ZImageModelLoader"]().load(DEMO_FILES["diffusion_models"], weight_dtype)[0]


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, 16, 6, 4, generator=g), torch.tensor([0.7]), [torch.randn(9, 32, generator=g)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_fp8_fast_weights_use_fp8_matmuls_and_stay_close():
    reference = _load("default").denoiser()(*_inputs())
    model = _load("fp8_e4m3fn_fast")
    # By name: ComfyUI imports the pack under its own package name, so the class object differs.
    fp8 = [m for m in model.module.modules() if type(m).__name__ == "Fp8Linear"]
    assert fp8 and all(m.weight.dtype == torch.float8_e4m3fn for m in fp8)
    out = model.denoiser()(*_inputs())
    assert torch.isfinite(out).all()
    # e4m3 keeps 3 mantissa bits (≈6% per weight); on random weights a step lands within ~5%.
    assert _rel(out, reference) < 0.1


def test_compile_node_keeps_the_output():
    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    model = _load("default")
    reference = model.denoiser()(*_inputs())
    compiled = nodes["ZImageCompileModel"]().compile(model)[0]
    assert _rel(compiled.denoiser()(*_inputs()), reference) < 1e-5
    # Still compiled after a forward: the eager fallback (which empties this) was not taken.
    assert compiled.module._compiled_blocks


def test_compile_vae_node_keeps_the_image():
    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    vae = nodes["ZImageVAELoader"]().load(DEMO_FILES["vae"])[0]
    raw = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(4))
    reference = vae.decode(raw)
    fused = nodes["ZImageCompileVAE"]().compile(vae)[0]
    assert fused.vae.is_channels_last
    image = fused.decode(raw)
    assert image.shape == reference.shape == (1, 32, 48, 3)
    assert float((image - reference).abs().max()) < 1e-4
