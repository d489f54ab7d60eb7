"""Omni reference images on our MODEL against ComfyUI's own Omni path (NextDiT), through ComfyUI's own nodes.

The conditioning comes from ComfyUI's TextEncodeZImageOmni (our CLIP and VAE on the demo files, and
optionally a SigLIP2 image encoder: ComfyUI's ClipVisionModel, as CLIPVisionLoader returns it); the same
CONDITIONING then goes through KSampler on native UNETLoader's model and on ours, from the same file: an Omni checkpoint (SigLIP embedder
and refiner) and a regular Z-Image one (ComfyUI runs references on it too). ComfyUI recognises Z-Image only
at its full width, so the files are full-width and shallow (1 main layer, 2 refiners) with the demo text
encoder's caption width; the SigLIP2 encoder has the real feature width but 2 layers (random weights).
"""

from __future__ import annotations

import gc

import pytest
import torch

from tests.comfy_harness import OMNI_EDIT, comfy, comfy_module, demo_prompt, fresh_run, nodes_of, saved_images
from zimage_core.demo_weights import DEMO_FILES, TEXT_HIDDEN, write_random_transformer
from zimage_core.transformer import TransformerConfig

OMNI = "zimage_parity_omni_full_width_shallow.safetensors"
REGULAR = "zimage_parity_regular_full_width_shallow.safetensors"
CONFIG = TransformerConfig(n_layers=1, n_refiner_layers=2, cap_feat_dim=TEXT_HIDDEN)
STEPS = 2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _siglip2_encoder(folder):
    """A SigLIP2 NaFlex image encoder as CLIPVisionLoader returns it (ComfyUI's ClipVisionModel and its own
    preprocessing), at the real feature width (1152) but 2 layers and 64 patches, with random weights."""
    import json

    clip_vision = comfy_module("comfy.clip_vision")
    config = folder / "siglip2_tiny_naflex.json"
    config.write_text(json.dumps({
        "num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152, "image_size": -1,
        "intermediate_size": 64, "model_type": "siglip2_vision_model", "num_attention_heads": 16,
        "num_hidden_layers": 2, "patch_size": 16, "num_patches": 64, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    encoder = clip_vision.ClipVisionModel(str(config))
    g = torch.Generator().manual_seed(21)
    state = {}
    for name, t in sorted(encoder.get_sd().items()):
        r = torch.randn(t.shape, generator=g)
        state[name] = r / t.shape[-1] ** 0.5 if t.ndim >= 2 else (1 + 0.1 * r if name.endswith("weight") else 0.02 * r)
    missing, _ = encoder.load_sd(state)
    assert not missing
    return encoder


@pytest.fixture(scope="module")
def omni_setup():
    nodes = comfy_module("nodes")
    if "TextEncodeZImageOmni" not in nodes.NODE_CLASS_MAPPINGS:
        pytest.skip("this ComfyUI has no TextEncodeZImageOmni (Omni conditioning came after 0.3.75)")
    mm = comfy_module("comfy.model_management")
    models = comfy().models_dir
    paths = [write_random_transformer(models / "diffusion_models" / OMNI,
                                      TransformerConfig(**{**CONFIG.__dict__, "siglip_feat_dim": 1152}), seed=5),
             write_random_transformer(models / "diffusion_models" / REGULAR, CONFIG, seed=5)]
    clip = nodes.NODE_CLASS_MAPPINGS["ZImageTextEncoderLoader"]().load(DEMO_FILES["text_encoders"])[0]
    vae = nodes.NODE_CLASS_MAPPINGS["ZImageVAELoader"]().load(DEMO_FILES["vae"])[0]
    encoder = _siglip2_encoder(models)
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(1, 48, 64, 3, generator=g), torch.rand(1, 32, 48, 3, generator=g)]  # sides: multiples of 16
    latent = nodes.NODE_CLASS_MAPPINGS["ZImageEmptyLatent"]().generate(32, 16, "custom", 1)[0]
    yield nodes, clip, vae, encoder, images, latent
    mm.unload_all_models()
    gc.collect()
    for p in paths:
        p.unlink(missing_ok=True)


def _omni_conditioning(nodes, clip, vae, encoder, images, prompt: str):
    node = nodes.NODE_CLASS_MAPPINGS["TextEncodeZImageOmni"]
    kwargs = {f"image{i + 1}": im for i, im in enumerate(images)}
    out = node.execute(clip=clip, prompt=prompt, image_encoder=encoder, auto_resize_images=False, vae=vae, **kwargs)
    return out[0]


# (refs, SigLIP2 encoder, cfg) per file; cfg > 1 runs the prompt and the negative prompt as one batch.
CASES = {OMNI: [(2, True, 2.0), (1, False, 1.0)], REGULAR: [(2, True, 1.0), (1, False, 2.0)]}


@pytest.mark.parametrize("file", [OMNI, REGULAR], ids=["omni-file", "regular-file"])
def test_omni_references_on_our_model_match_native(omni_setup, file):
    """1 and 2 references, with and without SigLIP features, alone and in a CFG batch: each model is loaded
    once per file (full-width files are slow to load on a CPU) and samples every case."""
    nodes, clip, vae, encoder, images, latent = omni_setup
    version = tuple(int(v) for v in comfy_module("comfyui_version").__version__.split(".")[:2])
    if version < (0, 28):
        pytest.skip("the full-width Omni parity runs on the newest ComfyUI CI has (0.28); the workflow test "
                    "below runs Omni conditioning on every ComfyUI that has it")
    mm = comfy_module("comfy.model_management")
    conds = []
    for n_refs, with_encoder, cfg in CASES[file]:
        refs, enc = images[:n_refs], encoder if with_encoder else None
        positive = _omni_conditioning(nodes, clip, vae, enc, refs, "make the cat wear a red hat")
        negative = _omni_conditioning(nodes, clip, vae, enc, refs, "blurry")
        extras = positive[0][1]
        assert len(extras["reference_latents"]) == n_refs
        assert len(extras["reference_latents_text_embeds"]) == n_refs + 1
        assert ("clip_vision_outputs" in extras) is with_encoder
        conds.append((positive, negative, cfg))
    results = {}
    for which in ("native", "ours"):
        if which == "native":
            model = nodes.UNETLoader().load_unet(file, "default")[0]
            assert type(model.model.model_config).__name__ == "ZImage"
            assert (getattr(model.model.diffusion_model, "siglip_embedder", None) is not None) is (file == OMNI)
        else:
            model = nodes.NODE_CLASS_MAPPINGS["ZImageModelLoader"]().load(file, "default")[0]
        for k, (positive, negative, cfg) in enumerate(conds):
            results[which, k] = nodes.KSampler().sample(model, 11, STEPS, cfg, "euler", "simple", positive, negative,
                                                        latent, 1.0)[0]["samples"]
        model = None
        mm.unload_all_models()
        gc.collect()
    for k, case in enumerate(CASES[file]):
        native, ours = results["native", k], results["ours", k]
        assert torch.isfinite(native).all() and native.shape == ours.shape
        # fp32 on the CPU; the implementations differ in op order (the token order, too) and ComfyUI's q/k
        # RMSNorm eps (see test_comfy_native_parity.py): observed ~1e-7.
        assert _rel(ours, native) < 1e-5, (case, _rel(ours, native))


def test_the_omni_reference_workflow_runs_on_the_demo_files():
    """workflows/z_image_omni_reference_edit.json (LoadImage -> TextEncodeZImageOmni with our CLIP and VAE -> our
    sampler) on the demo files, whose transformer has Omni layers: the reference picture steers the image."""
    if "TextEncodeZImageOmni" not in comfy_module("nodes").NODE_CLASS_MAPPINGS:
        pytest.skip("this ComfyUI has no TextEncodeZImageOmni (Omni conditioning came after 0.3.75)")
    prompt = demo_prompt(OMNI_EDIT, width=64, height=48, seed=3)
    (encode,) = nodes_of(prompt, "TextEncodeZImageOmni")
    assert prompt[encode]["inputs"]["auto_resize_images"] is True  # the test picture is 80x72: resized, odd latent
    (image,) = saved_images(fresh_run(prompt))
    assert image.shape == (48, 64, 3)
    (loader,) = nodes_of(prompt, "LoadImage")
    del prompt[encode]["inputs"]["image1"]  # the same prompt without the reference picture
    del prompt[loader]
    (plain,) = saved_images(fresh_run(prompt))
    assert (image != plain).any()
