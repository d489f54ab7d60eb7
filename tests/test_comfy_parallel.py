"""ZImageParallel under real ComfyUI: refused at queue time without 2 GPUs; with CPU workers ("cpu,cpu", gloo)
the sampled latents equal the single-process run's (the GPU path differs only in the device names and NCCL)."""

from __future__ import annotations

import gc
import multiprocessing

import pytest
import torch

from tests.comfy_harness import (
    CONTROLNET_CANNY,
    GGUF_T2I,
    T2I,
    TWO_LORAS,
    add_save_latent,
    comfy,
    demo_prompt,
    fresh_run,
    nodes_of,
    saved_latents,
)

SIZE = dict(width=64, height=48)


def _sampler(prompt: dict) -> str:
    return (nodes_of(prompt, "ZImageTurboSampler") + nodes_of(prompt, "KSampler"))[0]


def _with_parallel(prompt: dict, **inputs) -> tuple[dict, str]:
    """The prompt with ZImageParallel between the sampler and its model."""
    prompt = {k: {**v, "inputs": dict(v["inputs"])} for k, v in prompt.items()}
    sampler = _sampler(prompt)
    node = str(max(int(k) for k in prompt) + 50)
    prompt[node] = {"class_type": "ZImageParallel", "inputs": {"model": prompt[sampler]["inputs"]["model"], **inputs}}
    prompt[sampler]["inputs"]["model"] = [node, 0]
    return prompt, node


def _latent(prompt: dict) -> torch.Tensor:
    sampler = _sampler(prompt)
    add_save_latent(prompt, sampler, prefix="latents/parallel")
    return saved_latents(fresh_run(prompt))[-1]


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has several GPUs")
@pytest.mark.parametrize("gpus", ["2", "0,1", "cuda:1,cuda:3", "1"])
def test_refused_at_queue_time_without_two_gpus(gpus):
    prompt, node = _with_parallel(demo_prompt(T2I, **SIZE), gpus=gpus, mode="sequence")
    result = comfy().run(prompt)
    assert not result.ok
    assert node in result.node_errors  # a validation error: nothing ran
    assert "ZImageParallel" in result.error_message
    assert f"this machine has {torch.cuda.device_count()} CUDA GPU" in result.error_message


def _lora_variety_cfg(lora: float = 0.8, variety: float = 1.0) -> dict:
    """Two LoRAs, ZImageSeedVariety (a DIFFUSION_MODEL wrapper) and CFG (guidance 2: cond + uncond batched)."""
    prompt = demo_prompt(TWO_LORAS, seed=6, ZImageTurboSampler__guidance=2.0, ZImageLoraLoader__strength_model=lora,
                         **SIZE)
    sampler = _sampler(prompt)
    positive = prompt[sampler]["inputs"]["positive"][0]
    prompt["91"] = {"class_type": "ZImageTextEncode",  # a short negative: a CFG batch of two caption lengths
                    "inputs": {"text_encoder": prompt[positive]["inputs"]["text_encoder"], "text": "blurry"}}
    prompt[sampler]["inputs"]["negative"] = ["91", 0]
    prompt["90"] = {"class_type": "ZImageSeedVariety",
                    "inputs": {"model": prompt[sampler]["inputs"]["model"], "strength": variety, "end": 0.5}}
    prompt[sampler]["inputs"]["model"] = ["90", 0]
    return prompt


def test_cpu_workers_with_loras_wrappers_and_cfg_equal_the_single_process_run():
    """The node with CPU workers (gloo, sequence mode) behind LoRAs and ZImageSeedVariety, sampled with CFG."""
    expected = _latent(_lora_variety_cfg())
    prompt, _ = _with_parallel(_lora_variety_cfg(), gpus="cpu,cpu", mode="sequence")
    got = _latent(prompt)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 1e-4
    assert len(_workers()) == 2  # kept for the next prompt while ComfyUI holds the model
    # The LoRAs and the wrapper each matter, so the workers really hold the patched weights and the wrapper ran.
    assert float((_latent(_lora_variety_cfg(lora=0.0)) - expected).abs().max()) > 1e-3
    assert float((_latent(_lora_variety_cfg(variety=0.0)) - expected).abs().max()) > 1e-3
    # Those prompts replaced the parallel model in ComfyUI's caches and memory: its workers are gone with it.
    gc.collect()
    assert _workers() == []


def _workers() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("zimage-parallel-")]


def test_controlnet_patch_runs_on_the_workers_data_parallel():
    """ZImageControlNetApply before ZImageParallel in data mode (a batch of 2: one image per worker): the control
    latent is encoded on the main process, the ControlNet's weights go to the workers, each runs its hooks on its
    samples. (Sequence mode with ControlNet hooks: tests/test_parallel.py.)"""
    plain = demo_prompt(CONTROLNET_CANNY, seed=7, batch_size=2, **SIZE)
    expected = _latent(plain)
    prompt, _ = _with_parallel(plain, gpus="cpu,cpu", mode="data")
    got = _latent(prompt)
    assert got.shape[0] == 2
    assert float((got - expected).abs().max()) <= 1e-4
    no_control = demo_prompt(CONTROLNET_CANNY, seed=7, batch_size=2, ZImageControlNetApply__strength=0.0, **SIZE)
    assert float((_latent(no_control) - expected).abs().max()) > 1e-3


def test_gguf_model_runs_on_the_workers():
    """A GGUF transformer (block-quantised bytes in ComfyUI's layers): the workers get it dequantised."""
    from zimage_core.demo_weights import DEMO_GGUF_FILES, write_demo_gguf_models

    write_demo_gguf_models(comfy().models_dir)
    plain = demo_prompt(GGUF_T2I, seed=8, ZImageModelLoader__model_name=DEMO_GGUF_FILES["diffusion_models"], **SIZE)
    expected = _latent(plain)
    prompt, _ = _with_parallel(plain, gpus="cpu,cpu", mode="sequence")
    assert float((_latent(prompt) - expected).abs().max()) <= 1e-4
