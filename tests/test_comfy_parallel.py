"""ZImageParallel under real ComfyUI: refused at queue time without 2 GPUs; with CPU workers ("cpu,cpu", gloo)
the sampled latents equal the single-process run's (the GPU path differs only in the device names and NCCL)."""

from __future__ import annotations

import pytest
import torch

from tests.comfy_harness import (
    LORA_CORE,
    T2I,
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


def test_cpu_workers_with_a_lora_and_cfg_equal_the_single_process_run():
    """The node with CPU workers (gloo): a LoRA-patched model, CFG (cond + uncond in one batch), sequence mode."""
    plain = demo_prompt(LORA_CORE, seed=6, KSampler__cfg=2.0, **SIZE)
    expected = _latent(plain)
    prompt, _ = _with_parallel(plain, gpus="cpu,cpu", mode="sequence")
    got = _latent(prompt)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 1e-4
    # The LoRA matters (so the workers really hold the patched weights).
    no_lora = demo_prompt(LORA_CORE, seed=6, KSampler__cfg=2.0, **SIZE, LoraLoaderModelOnly__strength_model=0.0)
    assert float((_latent(no_lora) - expected).abs().max()) > 1e-3
