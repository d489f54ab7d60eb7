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


def _random_control_patch(seed: int = 13):
    """A random ZImage_Control (the Fun ControlNet Union 2.x layout: 3 control layers, refiner control, 17
    inpaint channels) as ModelPatchLoader returns it: a model patcher around ComfyUI's own module."""
    controlnet = comfy_module("comfy.ldm.lumina.controlnet")
    mm = comfy_module("comfy.model_management")
    model = controlnet.ZImage_Control(n_control_layers=3, additional_in_dim=17, refiner_control=True,
                                      dtype=torch.float32, device="cpu",
                                      operations=comfy_module("comfy.ops").manual_cast)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    patcher = comfy_module("comfy.model_patcher").ModelPatcher
    return patcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def test_zimage_fun_controlnet_patches_act_on_our_model_as_on_native(parity_setup):
    """ComfyUI 0.18.1's ZImageFunControlnet (ModelPatchLoader + patch) adds its control residuals through the
    noise_refiner / double_block patches; on our MODEL they must land exactly where NextDiT puts them."""
    nodes, cond, latent = parity_setup
    fun = nodes.NODE_CLASS_MAPPINGS.get("ZImageFunControlnet")
    if fun is None:
        pytest.skip("this ComfyUI has no ZImageFunControlnet (added after 0.3.75)")
    mm = comfy_module("comfy.model_management")
    from zimage_core.demo_weights import DEMO_FILES

    vae = nodes.NODE_CLASS_MAPPINGS["ZImageVAELoader"]().load(DEMO_FILES["vae"])[0]
    control = _random_control_patch()
    g = torch.Generator().manual_seed(21)
    image = torch.rand(1, 16, 32, 3, generator=g)  # the latent's 32x16 pixels, as a control image
    results = {}
    for which in ("native", "ours"):
        base = _base(nodes, which)
        if which == "native":
            plain = nodes.KSampler().sample(base, 77, STEPS, 1.0, "euler", "simple", cond, cond, latent, 1.0)[0]
        (patched,) = fun().diffsynth_controlnet(base, control, vae, image=image, strength=1.0)
        results[which] = nodes.KSampler().sample(patched, 77, STEPS, 1.0, "euler", "simple", cond, cond, latent,
                                                 1.0)[0]["samples"]
        base = patched = None
        mm.unload_all_models()
        gc.collect()
    assert _rel(results["native"], plain["samples"]) > 1e-3  # the control patch changes the result ...
    assert _rel(results["ours"], results["native"]) < 1e-4  # ... and does the same on our model


def _zimage_cfg_function(guidance: float, normalization: float, truncation: float):
    """Z-Image's CFG as a ComfyUI sampler_cfg_function, written here from diffusers' ZImagePipeline (not from
    our code): pred = pos + g·(pos − neg); no guidance where 1 − σ > truncation; the guided prediction's norm
    per image capped at normalization × the positive's. ComfyUI hands it x − denoised = σ·velocity."""

    def cfg(args):
        pos, neg = args["cond"], args["uncond"]
        sigma = float(args["sigma"].reshape(-1)[0])
        if 1.0 - sigma > truncation:
            return pos
        pred = pos + guidance * (pos - neg)
        if normalization > 0:
            out = []
            for p, q in zip(pred, pos, strict=True):
                limit = normalization * torch.linalg.vector_norm(q)
                norm = torch.linalg.vector_norm(p)
                out.append(p * (limit / norm) if norm > limit else p)
            pred = torch.stack(out)
        return pred

    return cfg


def test_guided_sampler_on_our_model_matches_ksampler_with_zimage_cfg_on_native(parity_setup):
    """ZImageTurboSampler with guidance g, cfg_normalization and cfg_truncation on our MODEL = KSampler (euler,
    simple, cfg 1 + g) on UNETLoader's model with Z-Image's CFG given to ComfyUI as a sampler_cfg_function."""
    nodes, cond, latent = parity_setup
    mm = comfy_module("comfy.model_management")
    g = torch.Generator().manual_seed(3)
    negative = [[torch.randn(1, 20, 2560, generator=g), {"pooled_output": None,
                                                          "attention_mask": torch.ones(1, 20, dtype=torch.long)}]]
    # 2 steps: sigmas 1, 0.75, 0 (KSampler's simple schedule hits ours exactly); the 2nd step is unguided.
    guidance, normalization, truncation, steps = 4.0, 1.0, 0.2, STEPS
    native = _base(nodes, "native").clone()
    native.set_model_sampler_cfg_function(_zimage_cfg_function(guidance, normalization, truncation))
    expected = nodes.KSampler().sample(native, 77, steps, 1.0 + guidance, "euler", "simple", cond, negative,
                                       latent, 1.0)[0]["samples"]
    native = None
    mm.unload_all_models()
    gc.collect()
    ours = _base(nodes, "ours")
    turbo = nodes.NODE_CLASS_MAPPINGS["ZImageTurboSampler"]()
    got = turbo.sample(ours, cond, latent, 77, steps, 3.0, guidance, negative=negative,
                       cfg_normalization=normalization, cfg_truncation=truncation)[0]["samples"]
    uncapped = turbo.sample(ours, cond, latent, 77, steps, 3.0, guidance, negative=negative,
                            cfg_truncation=truncation)[0]["samples"]
    ours = None
    mm.unload_all_models()
    gc.collect()
    print(f"ours vs KSampler + Z-Image CFG on native: {_rel(got, expected):.2e}; the norm cap changes the latent "
          f"by {_rel(uncapped, got):.2e}")
    assert _rel(got, expected) < 1e-5
    assert _rel(uncapped, got) > 1e-3  # the normalisation acted


FULL_AE = "zimage_parity_full_ae.safetensors"


def test_official_base_template_nodes_give_natives_latents_and_images_with_our_loaders(parity_setup):
    """ComfyUI's Base template (image_z_image) with our loaders in place of UNETLoader and VAELoader gives the
    latents and images of the template with ComfyUI's own: ModelSamplingAuraFlow, KSampler and VAEDecode with
    the template's settings (sampler, scheduler, cfg, shift; 2 steps instead of 25: CPU time), the same
    CONDITIONING. (ComfyUI's CLIPLoader builds Qwen3-4B at full size only, so the text encoder is compared
    with ComfyUI's own in tests/test_text_encoder.py instead.)"""
    import math

    from safetensors.torch import save_file

    from tests.test_comfy_base import SWAPS, _template, _template_prompt
    from zimage_core.demo_weights import _randomize
    from zimage_core.vae.flux_vae import FluxAEConfig, FluxVAE

    template = _template()
    if template is None:
        pytest.skip("this ComfyUI's workflow templates have no image_z_image (added with Z-Image Base, 2026-01)")
    nodes, cond, _ = parity_setup
    mm = comfy_module("comfy.model_management")
    flat = _template_prompt(template, swap=set(), files={"unet_name": FILE}, steps=STEPS, size=(32, 16), seed=77)
    settings = {n["class_type"]: n["inputs"] for n in flat.values()}
    ks, shift = settings["KSampler"], settings["ModelSamplingAuraFlow"]["shift"]
    assert (ks["sampler_name"], ks["scheduler"], ks["cfg"]) == ("res_multistep", "simple", 4)
    ae_path = comfy().models_dir / "vae" / FULL_AE
    with torch.device("meta"):
        ae = FluxVAE(FluxAEConfig())
    save_file(_randomize(ae.state_dict(), 8), str(ae_path))  # FLUX.1's ae.safetensors shapes, random
    g = torch.Generator().manual_seed(5)
    negative = [[torch.randn(1, 20, 2560, generator=g) * 0.1, {"pooled_output": None,
                                                                "attention_mask": torch.ones(1, 20, dtype=torch.long)}]]
    try:
        results = {}
        for which in ("native", "ours"):
            model = _base(nodes, which)
            model = nodes.NODE_CLASS_MAPPINGS["ModelSamplingAuraFlow"]().patch_aura(model, shift)[0]
            latent = nodes.NODE_CLASS_MAPPINGS["EmptySD3LatentImage"]().generate(32, 16, 1)
            latent = latent[0] if isinstance(latent, tuple) else latent.result[0]
            samples = nodes.KSampler().sample(model, ks["seed"], STEPS, ks["cfg"], ks["sampler_name"], ks["scheduler"],
                                              cond, negative, latent, ks["denoise"])[0]
            vae = (nodes.VAELoader().load_vae(FULL_AE)[0] if which == "native"
                   else nodes.NODE_CLASS_MAPPINGS[SWAPS["VAELoader"][0]]().load(FULL_AE)[0])
            results[which] = samples["samples"], nodes.VAEDecode().decode(vae, samples)[0]
            model = vae = None
            mm.unload_all_models()
            gc.collect()
    finally:
        ae_path.unlink(missing_ok=True)
    (lat_n, img_n), (lat_o, img_o) = results["native"], results["ours"]
    print(f"template latents ours vs native {_rel(lat_o, lat_n):.2e}; images max diff "
          f"{(img_o - img_n).abs().max():.2e}")
    assert _rel(lat_o, lat_n) < 1e-5
    assert img_o.shape == img_n.shape == (1, 16, 32, 3) and float((img_o - img_n).abs().max()) < 1e-4
    assert not math.isclose(float(img_n.std()), 0.0)
