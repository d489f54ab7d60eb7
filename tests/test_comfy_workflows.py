"""The shipped workflows executed by ComfyUI's own executor on demo checkpoints (tiny sizes for CPU CI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.comfy_harness import (
    BATCH,
    IMG2IMG,
    T2I,
    add_save_latent,
    comfy,
    comfy_module,
    demo_prompt,
    fresh_run,
    nodes_of,
    run_ok,
    saved_images,
    saved_latents,
)


def test_text_to_image_size_and_seed_reproducibility():
    prompt = demo_prompt(T2I, width=64, height=48, seed=7)
    (first,) = saved_images(fresh_run(prompt))
    assert first.shape == (48, 64, 3)
    (again,) = saved_images(fresh_run(prompt))
    assert np.array_equal(first, again), "the same seed must reproduce the same image"
    (other,) = saved_images(fresh_run(demo_prompt(T2I, width=64, height=48, seed=8)))
    assert not np.array_equal(first, other), "a different seed must change the image"


def test_seed_variations_workflow_gives_eight_varied_images():
    """One prompt, eight varied seeds: a batch of 8 through ZImageSeedVariety (strength 0 = without it)."""
    prompt = demo_prompt(BATCH, width=32, height=32, seed=4)
    (variety,) = nodes_of(prompt, "ZImageSeedVariety")
    assert prompt[variety]["inputs"]["strength"] > 0
    (latent,) = nodes_of(prompt, "ZImageEmptyLatent")
    assert prompt[latent]["inputs"]["batch_size"] == 8
    images = saved_images(fresh_run(prompt))
    assert len(images) == 8 and all(im.shape == (32, 32, 3) for im in images)
    assert all(not np.array_equal(a, b) for i, a in enumerate(images) for b in images[i + 1:])
    plain = saved_images(fresh_run(demo_prompt(BATCH, width=32, height=32, seed=4, ZImageSeedVariety__strength=0.0)))
    assert len(plain) == 8
    assert any(not np.array_equal(a, b) for a, b in zip(images, plain, strict=True)), "the variety changes them"


def test_img2img_strength_zero_returns_the_source_latent():
    prompt = demo_prompt(IMG2IMG, ZImageImg2ImgSampler__strength=0.0)
    (encode,) = nodes_of(prompt, "ZImageVAEEncode")
    (sampler,) = nodes_of(prompt, "ZImageImg2ImgSampler")
    add_save_latent(prompt, encode, "latents/source")
    add_save_latent(prompt, sampler, "latents/result")
    result = fresh_run(prompt)
    source, out = saved_latents(result)
    # The 80x72 test picture is centre-cropped to 80x64 (multiples of 16) before encoding.
    assert source.shape == (1, 16, 8, 10)
    assert torch.equal(source, out)
    (image,) = saved_images(result)
    assert image.shape == (64, 80, 3)


def test_img2img_with_strength_changes_the_image():
    prompt = demo_prompt(IMG2IMG, ZImageImg2ImgSampler__strength=0.5)
    (encode,) = nodes_of(prompt, "ZImageVAEEncode")
    (sampler,) = nodes_of(prompt, "ZImageImg2ImgSampler")
    add_save_latent(prompt, encode, "latents/source")
    add_save_latent(prompt, sampler, "latents/result")
    source, out = saved_latents(fresh_run(prompt))
    assert out.shape == source.shape and not torch.equal(source, out)
    assert torch.isfinite(out).all()


def test_sampler_node_equals_zimage_core_direct_sampling():
    """No drift through the node layer: the LATENT ComfyUI saves equals zimage_core's own result."""
    from zimage_core.demo_weights import DEMO_FILES
    from zimage_core.sampling import make_noise, sample_text_to_image
    from zimage_core.text_encoder import load_text_encoder
    from zimage_core.transformer import load_transformer
    from zimage_core.vae import denormalize_latents

    prompt = demo_prompt(T2I, width=64, height=32, seed=123)
    (sampler,) = nodes_of(prompt, "ZImageTurboSampler")
    add_save_latent(prompt, sampler, "latents/drift")
    (node_latent,) = saved_latents(fresh_run(prompt))

    models = comfy().models_dir
    text = prompt[nodes_of(prompt, "ZImageTextEncode")[0]]["inputs"]["text"]
    # The node keeps the text encoder's bf16 weights and computes in fp32 on them (as ComfyUI's CLIP), the DiT in
    # fp32 on the CPU.
    encoder = load_text_encoder(models / "text_encoders" / DEMO_FILES["text_encoders"], compute_dtype=torch.float32)
    model = load_transformer(models / "diffusion_models" / DEMO_FILES["diffusion_models"], dtype=torch.float32)
    noise = make_noise((1, 16, 4, 8), 123)
    captions = [c.float() for c in encoder.encode([text])]
    direct = denormalize_latents(sample_text_to_image(model, captions, noise, steps=8, shift=3.0))
    assert node_latent.shape == direct.shape
    # The node samples with ComfyUI's Euler (x + (σ' − σ)·v written as ComfyUI's to_d form), zimage_core with
    # its own update: the same schedule and network in fp32 differ only in rounding.
    torch.testing.assert_close(node_latent, direct.float(), rtol=1e-5, atol=1e-5)


class _ProgressRecorder:
    def __init__(self, interrupt_after: int | None = None) -> None:
        self.updates: list[tuple[int, int, object]] = []
        self.interrupt_after = interrupt_after

    def __call__(self, value, total, preview, node_id=None):
        self.updates.append((value, total, preview))
        if self.interrupt_after is not None and len(self.updates) >= self.interrupt_after:
            comfy_module("nodes").interrupt_processing(True)


@pytest.fixture
def progress_hook():
    utils = comfy_module("comfy.utils")
    recorders = []

    def install(**kwargs):
        recorder = _ProgressRecorder(**kwargs)
        recorders.append(recorder)
        utils.set_progress_bar_global_hook(recorder)
        return recorder

    yield install
    utils.set_progress_bar_global_hook(None)
    comfy_module("nodes").interrupt_processing(False)


def test_sampler_reports_progress_with_latent_previews(progress_hook):
    cli = comfy_module("comfy.cli_args")
    previews_module = comfy_module("latent_preview")
    recorder = progress_hook()
    before = cli.args.preview_method
    # As `main.py --preview-method auto`. ComfyUI 0.18.1 resets the method per prompt to the launch value
    # it keeps in latent_preview.default_preview_method, so that one is set too.
    before_default = getattr(previews_module, "default_preview_method", None)
    cli.args.preview_method = cli.LatentPreviewMethod.Auto
    if before_default is not None:
        previews_module.default_preview_method = cli.LatentPreviewMethod.Auto
    try:
        fresh_run(demo_prompt(T2I, width=64, height=48, seed=3))
    finally:
        cli.args.preview_method = before
        if before_default is not None:
            previews_module.default_preview_method = before_default
    steps = [(v, t) for v, t, p in recorder.updates if t == 8]
    assert steps == [(i, 8) for i in range(1, 9)]
    previews = [p for _, t, p in recorder.updates if t == 8]
    for fmt, image, _size in previews:  # ComfyUI's (format, PIL image, max size) preview tuple
        assert fmt == "JPEG" and image.size == (64 // 8, 48 // 8)


def test_cancel_stops_sampling_promptly_and_next_job_runs(progress_hook):
    recorder = progress_hook(interrupt_after=1)  # press Cancel right after the first step
    comfy().executor.reset()
    result = comfy().run(demo_prompt(T2I, width=64, height=48, seed=4))
    assert not result.ok
    events = [event for event, _ in result.messages]
    assert "execution_interrupted" in events
    assert len([u for u in recorder.updates if u[1] == 8]) == 1, "sampling went on after Cancel"
    progress_hook()  # no interruption
    (image,) = saved_images(run_ok(demo_prompt(T2I, width=64, height=48, seed=4)))
    assert image.shape == (48, 64, 3)


def test_core_latent_ops_fit_between_our_nodes():
    """ComfyUI's LatentFromBatch between ZImageEmptyLatent and our sampler: the picked sample gets the same
    noise (and so the same latent) as in the full batch, as with KSampler."""
    prompt = demo_prompt(T2I, width=32, height=32, batch_size=3, seed=9)
    (latent,) = nodes_of(prompt, "ZImageEmptyLatent")
    (sampler,) = nodes_of(prompt, "ZImageTurboSampler")
    add_save_latent(prompt, sampler, "latents/full")
    prompt["900"] = {"class_type": "LatentFromBatch", "inputs": {"samples": [latent, 0], "batch_index": 1, "length": 1}}
    prompt["901"] = {"class_type": "ZImageTurboSampler", "inputs": {**prompt[sampler]["inputs"], "latent": ["900", 0]}}
    add_save_latent(prompt, "901", "latents/picked")
    full, picked = sorted(saved_latents(fresh_run(prompt)), key=lambda t: -t.shape[0])
    assert full.shape[0] == 3 and picked.shape[0] == 1
    torch.testing.assert_close(picked, full[1:2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_dtype", ["bf16", "fp16", "fp8_e4m3fn"])
def test_weight_dtypes_run_through_comfy_ops(weight_dtype):
    """Storage dtypes other than the compute dtype go through comfy.ops.manual_cast and stay close to fp32."""
    prompt = demo_prompt(T2I, width=32, height=32, seed=21)
    (sampler,) = nodes_of(prompt, "ZImageTurboSampler")
    add_save_latent(prompt, sampler, "latents/fp32")
    (reference,) = saved_latents(fresh_run(prompt))
    prompt[nodes_of(prompt, "ZImageModelLoader")[0]]["inputs"]["weight_dtype"] = weight_dtype
    (latent,) = saved_latents(fresh_run(prompt))
    assert torch.isfinite(latent).all()
    # Same picture up to the weights' rounding (fp8 ~0.04 here; two different seeds differ by ~1.5).
    error = (latent - reference).norm() / reference.norm()
    assert error < 0.1, f"{weight_dtype}: relative difference {error:.3f} to fp32"


def test_core_nodes_behind_our_loaders_workflow():
    """LoraLoaderModelOnly → KSampler → VAEDecodeTiled on our MODEL/CLIP/VAE: with the LoRA at strength 0 it
    is the text-to-image workflow's picture (same seed, prompt and size); at 1 the LoRA changes it."""
    from tests.comfy_harness import LORA_CORE

    prompt = demo_prompt(LORA_CORE, width=64, height=48, seed=11, LoraLoaderModelOnly__strength_model=0.0)
    (plain,) = saved_images(fresh_run(prompt))
    assert plain.shape == (48, 64, 3)
    text = prompt[nodes_of(prompt, "CLIPTextEncode")[0]]["inputs"]["text"]
    t2i = demo_prompt(T2I, width=64, height=48, seed=11)
    t2i[nodes_of(t2i, "ZImageTextEncode")[0]]["inputs"]["text"] = text
    (ours,) = saved_images(fresh_run(t2i))
    assert np.abs(plain.astype(int) - ours.astype(int)).max() <= 1
    prompt = demo_prompt(LORA_CORE, width=64, height=48, seed=11, LoraLoaderModelOnly__strength_model=1.0)
    (with_lora,) = saved_images(fresh_run(prompt))
    assert np.abs(with_lora.astype(int) - plain.astype(int)).mean() > 1
