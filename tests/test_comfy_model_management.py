"""Our models under ComfyUI's model management (ModelPatcher), exercised on the CPU."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import pytest
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


def test_out_of_memory_with_prefetched_weights_finishes_the_step_with_comfyui_copies(monkeypatch, caplog):
    """Prefetch slots are GPU memory ComfyUI's plan does not count. If a step runs out of memory with them,
    the step (and the job) finishes with ComfyUI's own per-layer copies, and later steps do not try again.
    The GPU's out-of-memory error is raised where the prefetching would run (this machine has no GPU)."""
    patcher = _model()
    dm = patcher.model.diffusion_model
    core_model = sys.modules[type(dm).__module__]
    g = torch.Generator().manual_seed(2)
    x, sigma, context = torch.randn(1, 16, 4, 6, generator=g), torch.tensor([0.4]), torch.randn(1, 9, 32, generator=g)
    reference = _velocity(patcher, x, sigma, context)
    tries = []

    @contextlib.contextmanager
    def tight_card(blocks):
        def out_of_memory(module, args):
            tries.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 260.00 MiB (simulated)")
        handle = blocks[3].register_forward_pre_hook(out_of_memory)
        try:
            yield
        finally:
            handle.remove()

    monkeypatch.setattr(dm, "prefetch_offloaded", True, raising=False)
    monkeypatch.setattr(core_model, "prefetch_context", lambda blocks, device: tight_card(blocks))
    with caplog.at_level(logging.WARNING):
        assert torch.equal(_velocity(patcher, x, sigma, context), reference)
        assert torch.equal(_velocity(patcher, x, sigma, context), reference)
    assert tries == [1] and dm.prefetch_offloaded is False
    assert "out of GPU memory with prefetched weights" in caplog.text


def test_models_report_sizes_and_memory_estimates_to_comfyui():
    patcher = _model()
    weights = sum(t.numel() * t.element_size() for t in patcher.model.state_dict().values())
    assert patcher.model_size() == weights  # what ComfyUI budgets for the weights (and the sigma table)
    model = patcher.model
    small = model.memory_required((1, 16, 64, 64))
    assert model.memory_required((1, 16, 128, 128)) > small  # activations grow with the image
    assert model.memory_required((2, 16, 64, 64)) > small  # and with the batch (CFG doubles it)


def test_partial_loading_spreads_the_layers_left_in_host_memory_over_the_blocks():
    """A card that cannot hold the model: ComfyUI leaves the layers its load order reaches last in host
    memory. Among equal-size layers (the FFN's w1/w2/w3), those are one kind across all blocks, so every
    block waits for a similar share of copies, not three layers of one block and none of the next."""
    patcher = _model()
    blocks = patcher.model.diffusion_model.blocks()
    cpu = torch.device("cpu")
    total = patcher.model_size()
    seen = set()
    for budget in range(total // 2, total, total // 40):
        patcher.patch_model(device_to=cpu, lowvram_model_memory=budget)
        try:
            counts = [sum(1 for n, m in b.named_modules()
                          if n.startswith("feed_forward.w") and getattr(m, "comfy_cast_weights", False))
                      for b in blocks]
        finally:
            patcher.unpatch_model(device_to=cpu)
        assert max(counts) - min(counts) <= 1, (budget, counts)
        seen.add(sum(counts))
    assert len(seen) >= 6  # the budgets covered partial offloading of the FFN layers, not only all or none
    # The order is a property of the patcher class, so LoRA loaders' clones keep it.
    assert type(patcher.clone())._load_list is type(patcher)._load_list


def test_loading_a_partly_loaded_model_again_keeps_what_is_loaded():
    """Every prompt, ComfyUI loads the sampled model again with the memory now free. With as much free as
    last time, a partly loaded transformer must keep its loaded layers (and ComfyUI's count of them): a
    shrinking count leaves layers on the GPU uncounted, and every prompt then finds less free memory."""
    patcher = _model()
    cpu = torch.device("cpu")
    patcher.patch_model(device_to=cpu, lowvram_model_memory=int(patcher.model_size() * 0.7))
    try:
        loaded = patcher.model.model_loaded_weight_memory
        assert patcher.model.model_lowvram and 0 < loaded < patcher.model_size()
        for _ in range(3):
            patcher.partially_load(cpu, extra_memory=0)
            assert patcher.model.model_loaded_weight_memory == loaded
        # A little more free memory (less than ComfyUI's cast buffer) is used, not lost.
        patcher.partially_load(cpu, extra_memory=patcher.model.model_offload_buffer_memory // 2)
        grown = patcher.model.model_loaded_weight_memory
        assert grown > loaded
        patcher.partially_load(cpu, extra_memory=0)
        assert patcher.model.model_loaded_weight_memory == grown
        loaded = grown
        # Less memory than loaded: ComfyUI's own partial unload still runs.
        patcher.partially_load(cpu, extra_memory=-(loaded // 2))
        assert patcher.model.model_loaded_weight_memory <= loaded // 2 + loaded // 10
    finally:
        patcher.unpatch_model(device_to=cpu)


def test_sampling_memory_estimate_keeps_room_for_the_vae_decode(monkeypatch):
    """ComfyUI sizes the transformer's share of a small card from this estimate; the decode after sampling
    must then find its memory without unloading part of the transformer (to be loaded again for the next
    prompt). ComfyUI's estimate on a CUDA device with PyTorch attention is the one that can be smaller than
    the decode's; on the CPU it is far larger, so the test takes ComfyUI's CUDA branch."""
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "pytorch_attention_flash_attention", lambda: True)
    patcher = _model()
    vae = comfy_module("nodes").NODE_CLASS_MAPPINGS["ZImageVAELoader"]().load(DEMO_FILES["vae"])[0]
    from zimage_core.vae import FREE_FRACTION

    for shape in [(1, 16, 128, 128), (2, 16, 128, 128), (1, 16, 96, 160)]:
        one_image = (1, *shape[1:])
        # What ZImageVAEDecode asks ComfyUI for: room for a whole decode, and the VAE's weights.
        decode = vae.memory_used_decode(one_image, vae.vae_dtype) / FREE_FRACTION + vae.patcher.model_size()
        assert patcher.model.memory_required(shape) >= decode, shape


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


def test_text_encoder_streamed_from_host_memory_gives_the_same_features_and_leaves_no_trace():
    """When the encoder does not fit beside the diffusion model, ZImageCLIP streams its layers through the
    GPU for one encode. Here the streaming device is the CPU (no GPU in CI): the features must equal the
    resident encode, and afterwards the layers must be plain parameters again (no hooks, nothing moved)
    so ComfyUI can load or offload them as usual."""
    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    clip = nodes["ZImageTextEncoderLoader"]().load(DEMO_FILES["text_encoders"])[0]
    model = clip.cond_stage_model
    tokens = clip.tokenize("a red fox in the snow")
    reference = model.encode_token_weights(tokens)[0]
    layer = model.encoder.model.layers[0]
    before = [p.data_ptr() for p in layer.parameters()]
    seen = []  # the weights layer 0 ran with: a streaming slot, not its own parameters
    probe = layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(m.weight.data_ptr()))
    model.stream_device = torch.device("cpu")
    try:
        streamed = model.encode_token_weights(tokens)[0]
    finally:
        model.stream_device = None
        probe.remove()
    assert seen and seen[0] != before[[n for n, _ in layer.named_parameters()].index("self_attn.q_proj.weight")]
    assert torch.equal(streamed, reference)
    assert not layer._forward_pre_hooks and not layer._forward_hooks
    assert [p.data_ptr() for p in layer.parameters()] == before
    assert model.encoder.device.type == "cpu"
    # A plain load (ComfyUI deciding it fits) clears the streaming choice.
    clip.load_model()
    assert model.stream_device is None


def test_text_encoder_weights_are_page_locked_in_the_background_and_encodes_wait_for_it():
    """The first streamed encode after a load or an offload must not page-lock 7.3 GiB itself (4.35 s inside
    the prompt on an H100): the CLIP pins its CPU weights in the background as soon as they land there, and
    anything that uses them waits for that to finish. No GPU here: the page-locking primitive is a stand-in
    that is slow on purpose and records the copies it made."""
    import threading
    import time

    from zimage_core.accel.streaming import HostPinner

    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    clip = nodes["ZImageTextEncoderLoader"]().load(DEMO_FILES["text_encoders"])[0]
    model = clip.cond_stage_model
    assert model._pinner is None  # a CPU load device: nothing to stream, nothing pinned
    tokens = clip.tokenize("a red fox in the snow")
    reference = model.encode_token_weights(tokens)[0]
    made, lock = set(), threading.Lock()

    def slow_pin(t):
        time.sleep(0.002)
        copy = t.clone()
        with lock:
            made.add(copy.data_ptr())
        return copy

    def host_tensors():
        return [t for t in [*model.parameters(), *model.buffers()] if t.device.type == "cpu"]

    model._pinner = HostPinner(model, pin=slow_pin)
    model._pinner.start()
    assert model._pinner.running
    features = model.encode_token_weights(tokens)[0]  # waits for the pin, then encodes the same
    assert not model._pinner.running
    assert torch.equal(features, reference)
    assert all(t.data_ptr() in made for t in host_tensors())
    # An offload brings fresh (pageable) CPU tensors: pinning starts again by itself, and loading waits.
    made.clear()
    model.double()
    assert model._pinner.running
    clip.load_model()
    assert not model._pinner.running and all(t.data_ptr() in made for t in host_tensors())
    model.float()
    model.wait_host_weights()
    # A host that cannot page-lock: the weights stay usable and pinning is not retried on every offload.
    model._pinner = HostPinner(model, pin=lambda t: (_ for _ in ()).throw(RuntimeError("no page-locked memory")))
    model.double()
    model.wait_host_weights()
    assert model._pinner is None
    assert torch.equal(model.float().encode_token_weights(tokens)[0], reference)


def test_text_encoder_memory_request_scales_with_tokens_not_characters():
    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    clip = nodes["ZImageTextEncoderLoader"]().load(DEMO_FILES["text_encoders"])[0]
    model = clip.cond_stage_model
    short = model.memory_estimation_function(clip.tokenize("a red fox"))
    huge_tokens = clip.tokenize("fox " * 50_000)  # 200,000 characters
    assert sum(len(chunk) for chunk in huge_tokens["qwen3_4b"]) <= 1504  # Z-Image's caption limit
    huge = model.memory_estimation_function(huge_tokens)
    assert short < huge <= 1504 / 8 * short  # at most the capped token count's share (8 template tokens+)


def test_cancel_interrupts_loading_and_tiled_vae_decoding_and_the_next_job_runs():
    mm = comfy_module("comfy.model_management")
    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    vae = nodes["ZImageVAELoader"]().load(DEMO_FILES["vae"])[0]
    raw = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    calls = []
    original = vae.flux.decode

    def tiled_decode(latents, **kwargs):  # force tiles, as on a card without room for the whole image
        calls.append(kwargs.get("check_interrupt"))
        return original(latents, tiled=True, tile_size=32, overlap=8, **kwargs)

    vae.flux.decode = tiled_decode
    try:
        mm.interrupt_current_processing(True)
        with pytest.raises(mm.InterruptProcessingException):
            nodes["ZImageVAEDecode"]().decode(vae, {"samples": raw})
        mm.interrupt_current_processing(True)  # ComfyUI clears the flag when it raises
        with pytest.raises(mm.InterruptProcessingException):
            nodes["ZImageModelLoader"]().load(DEMO_FILES["diffusion_models"], "default")
    finally:
        mm.interrupt_current_processing(False)
        del vae.flux.decode
    assert calls and calls[0] is mm.throw_exception_if_processing_interrupted
    assert nodes["ZImageVAEDecode"]().decode(vae, {"samples": raw})[0].shape == (1, 64, 64, 3)
    assert _model() is not None


def test_loaders_report_a_changed_file_to_comfyui(tmp_path):
    import shutil

    from tests.comfy_harness import comfy

    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    folder = comfy().models_dir / "vae"
    name = "zimage_changed_on_disk_ae.safetensors"
    shutil.copyfile(folder / DEMO_FILES["vae"], folder / name)
    try:
        loader = nodes["ZImageVAELoader"]
        before = loader.IS_CHANGED(vae_name=name)
        assert loader.IS_CHANGED(vae_name=name) == before  # unchanged file: ComfyUI keeps the cached model
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:-4] + b"\0\0\0\0")  # same size, rewritten in place
        os.utime(folder / name, ns=(1, 1))
        assert loader.IS_CHANGED(vae_name=name) != before  # ComfyUI loads it again on the next queue
    finally:
        (folder / name).unlink(missing_ok=True)


def test_loaders_honour_comfyui_disable_mmap():
    import sys

    args = comfy_module("comfy.cli_args").args
    nodes = comfy_module("nodes").NODE_CLASS_MAPPINGS
    core_model = sys.modules[nodes["ZImageModelLoader"].__module__.rsplit(".", 1)[0] + ".core_model"]
    before = getattr(args, "disable_mmap", False)
    args.disable_mmap = True
    try:
        assert core_model.load_options()["mmap"] is False  # what every loader passes to zimage_core
        vae = nodes["ZImageVAELoader"]().load(DEMO_FILES["vae"])[0]  # plain reads still load the file
        assert vae.decode(torch.zeros(1, 16, 2, 2)).shape == (1, 16, 16, 3)
    finally:
        args.disable_mmap = before
    assert core_model.load_options()["mmap"] is (not before)
