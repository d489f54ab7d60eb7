"""Our core MODEL against ComfyUI's own native Z-Image, on the same checkpoint file, through core nodes.

ComfyUI recognises a Z-Image transformer only at its real width (dim 3840, 30 heads; see
comfy/model_detection.py) and always builds 2 refiner layers, so the file here is full-width but
shallow: 1 main layer, 2 noise/context refiners (908M random parameters, 1.8 GB bf16). Native path:
UNETLoader; ours: ZImageModelLoader. Both go through the same core nodes (LoraLoaderModelOnly, KSampler
euler/simple/cfg 1, 2 steps at 32x16 pixels: more costs CPU time and adds nothing to the comparison), with the same
seed, CONDITIONING and empty LATENT; ZImageTurboSampler must give the same latent from either MODEL.
"""

from __future__ import annotations

import gc

import pytest
import torch

from tests.comfy_harness import comfy, comfy_module
from zimage_core.demo_weights import write_random_lora, write_random_transformer
from zimage_core.transformer import TransformerConfig

FILE = "zimage_parity_full_width_shallow.safetensors"
CONFIG = TransformerConfig(n_layers=1, n_refiner_layers=2)
LORAS = {dialect: f"zimage_parity_lora_{dialect}.safetensors" for dialect in ("comfyui", "diffusers")}
STEPS = 2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def parity_setup():
    mm = comfy_module("comfy.model_management")
    models = comfy().models_dir
    path = models / "diffusion_models" / FILE
    write_random_transformer(path, CONFIG, seed=5)
    # One random weight change written in ComfyUI's (fused qkv) and in diffusers' (split q/k/v) key names.
    loras = [write_random_lora(models / "loras" / name, CONFIG, dialect=d, seed=9, scale=0.3)
             for d, name in LORAS.items()]
    nodes = comfy_module("nodes")
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, 20, 2560, generator=g)
    cond = [[features, {"pooled_output": None, "attention_mask": torch.ones(1, 20, dtype=torch.long)}]]
    latent = nodes.NODE_CLASS_MAPPINGS["ZImageEmptyLatent"]().generate(32, 16, "custom", 1)[0]
    yield nodes, cond, latent
    mm.unload_all_models()
    gc.collect()
    for p in [path, *loras]:
        p.unlink(missing_ok=True)


def _base(nodes, which: str):
    if which == "native":
        model = nodes.UNETLoader().load_unet(FILE, "default")[0]
        assert type(model.model.model_config).__name__ == "ZImage"  # ComfyUI's own Z-Image support
        return model
    return nodes.NODE_CLASS_MAPPINGS["ZImageModelLoader"]().load(FILE, "default")[0]


def _with_lora(nodes, model, lora: str | None):
    if lora is None:
        return model
    return nodes.LoraLoaderModelOnly().load_lora_model_only(model, LORAS[lora], 1.0)[0]


def test_core_samplers_on_our_model_match_unetloader_with_and_without_loras(parity_setup):
    nodes, cond, latent = parity_setup
    mm = comfy_module("comfy.model_management")
    turbo = nodes.NODE_CLASS_MAPPINGS["ZImageTurboSampler"]()
    results = {}
    for which in ("native", "ours"):
        base = _base(nodes, which)  # loaded once; each LoRA is a clone patched when it is sampled
        for lora in (None, "comfyui", "diffusers"):
            model = _with_lora(nodes, base, lora)
            results[which, lora] = nodes.KSampler().sample(model, 77, STEPS, 1.0, "euler", "simple", cond, cond,
                                                           latent, 1.0)[0]["samples"]
        results[which, "turbo"] = turbo.sample(base, cond, latent, 77, STEPS, 3.0, 0.0)[0]["samples"]
        base = model = None
        mm.unload_all_models()
        gc.collect()
    for key in (None, "comfyui", "diffusers", "turbo"):
        a, b = results["native", key], results["ours", key]
        assert torch.isfinite(a).all() and a.shape == b.shape
        # fp32 on the CPU; the implementations differ in op order and ComfyUI's q/k RMSNorm eps (dtype
        # default vs 1e-5): observed relative error ~1e-6.
        assert _rel(b, a) < 1e-4, f"{key}: {_rel(b, a)}"
    # The LoRAs really change the image (so the comparison above covers them being applied) ...
    assert _rel(results["native", "comfyui"], results["native", None]) > 1e-2
    # ... and both key dialects describe the same change, on our fused qkv as on ComfyUI's.
    assert _rel(results["ours", "diffusers"], results["ours", "comfyui"]) < 1e-5
    # ZImageTurboSampler's schedule is KSampler's simple/shift-3 one: the same latent from either node.
    torch.testing.assert_close(results["native", "turbo"], results["native", None], rtol=1e-5, atol=1e-5)
