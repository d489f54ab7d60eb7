"""Bad input through the nodes: each mistake reaches ComfyUI's error display as one clear message, and the
next queued job still runs."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

from tests.comfy_harness import LOADER_INPUTS, T2I, comfy, demo_prompt, nodes_of, run_ok, saved_images
from zimage_core.demo_weights import DEMO_FILES


def _place(src_folder: str, dst_folder: str, name: str) -> str:
    models = comfy().models_dir
    (models / dst_folder).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(models / src_folder / DEMO_FILES[src_folder], models / dst_folder / name)
    return name


def _assert_next_job_runs() -> None:
    (image,) = saved_images(run_ok(demo_prompt(T2I, width=32, height=32, seed=11)))
    assert image.shape == (32, 32, 3)


def _failed(prompt: dict):
    comfy().executor.reset()
    result = comfy().run(prompt)
    assert not result.ok
    assert result.error is not None
    return result


@pytest.mark.parametrize("loader,source_folder", [
    ("ZImageModelLoader", "vae"),              # the VAE picked as the diffusion model
    ("ZImageTextEncoderLoader", "diffusion_models"),  # the DiT picked as the text encoder
    ("ZImageVAELoader", "text_encoders"),      # the text encoder picked as the VAE
])
def test_wrong_file_in_each_loader(loader, source_folder):
    input_name, folder = LOADER_INPUTS[loader]
    wrong = _place(source_folder, folder, f"wrong_{source_folder}_file.safetensors")
    prompt = demo_prompt(T2I, width=32, height=32)
    prompt[nodes_of(prompt, loader)[0]]["inputs"][input_name] = wrong
    result = _failed(prompt)
    message = result.error["exception_message"]
    assert result.error["node_type"] == loader
    assert result.error["exception_type"].endswith("CheckpointError")
    assert wrong in message and "expected" in message
    assert "Traceback" not in message
    _assert_next_job_runs()


def test_truncated_file_in_model_loader():
    models = comfy().models_dir
    good = models / "diffusion_models" / DEMO_FILES["diffusion_models"]
    bad = models / "diffusion_models" / "truncated_download.safetensors"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    prompt = demo_prompt(T2I, width=32, height=32)
    prompt[nodes_of(prompt, "ZImageModelLoader")[0]]["inputs"]["model_name"] = bad.name
    message = _failed(prompt).error["exception_message"]
    assert bad.name in message and "download" in message.lower()
    _assert_next_job_runs()


def test_size_not_divisible_by_16_is_refused_at_queue_time():
    prompt = demo_prompt(T2I, width=72, height=64)
    comfy().executor.reset()
    result = comfy().run(prompt)
    assert not result.ok and not result.messages  # refused by validation: nothing was executed
    (latent_node,) = nodes_of(prompt, "ZImageEmptyLatent")
    message = " ".join(e["details"] for e in result.node_errors[latent_node]["errors"])
    assert "divisible by 16" in message and "72" in message and "64 or 80" in message
    _assert_next_job_runs()


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_prompt(text):
    result = _failed(demo_prompt(T2I, width=32, height=32, ZImageTextEncode__text=text))
    assert result.error["node_type"] == "ZImageTextEncode"
    assert "prompt is empty" in result.error["exception_message"]
    _assert_next_job_runs()


def test_non_finite_latents_give_a_sampling_error():
    models = comfy().models_dir
    state = load_file(str(models / "diffusion_models" / DEMO_FILES["diffusion_models"]))
    key = next(k for k in state if k.endswith("final_layer.linear.weight"))
    state[key] = state[key].float().fill_(float("inf")).to(state[key].dtype)
    save_file(state, str(models / "diffusion_models" / "overflowing_model.safetensors"))
    prompt = demo_prompt(T2I, width=32, height=32)
    prompt[nodes_of(prompt, "ZImageModelLoader")[0]]["inputs"]["model_name"] = "overflowing_model.safetensors"
    result = _failed(prompt)
    assert result.error["node_type"] == "ZImageTurboSampler"
    assert result.error["exception_type"].endswith("SamplingError")
    assert "step" in result.error["exception_message"]
    _assert_next_job_runs()


def test_guidance_without_negative_is_explained():
    result = _failed(demo_prompt(T2I, width=32, height=32, ZImageTurboSampler__guidance=2.0))
    assert "negative" in result.error["exception_message"]
    _assert_next_job_runs()
