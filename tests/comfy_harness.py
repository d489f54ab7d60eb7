"""Test harness: one real ComfyUI (installed by scripts/setup.sh) booted in-process per test session.

ComfyUI comes from `$ZIMAGE_COMFYUI_DIR` or `<repo>/.comfyui/ComfyUI`; it is never mocked. The pack is
loaded by ComfyUI's own custom-node loader (a custom_nodes folder holding a symlink to this checkout,
registered through an extra-model-paths file), and the demo checkpoints of zimage_core.demo_weights are
written into the model folders in the real file formats. ComfyUI keeps process-wide state, so the
instance is a lazily created singleton shared by all test modules (`comfy()`).
"""

from __future__ import annotations

import atexit
import copy
import shutil
import tempfile
from pathlib import Path

import pytest

from scripts.comfy_headless import HeadlessComfyUI, RunResult, default_comfyui_dir, load_workflow
from tests import comfyui_reference
from zimage_core.demo_weights import (
    DEMO_FILES,
    DEMO_TRANSFORMER,
    demo_text_encoder_lora_targets,
    random_lora_state_dict,
    random_text_encoder_lora_state_dict,
    write_demo_models,
    write_lora,
)

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
T2I = WORKFLOWS / "z_image_turbo_text_to_image.json"
IMG2IMG = WORKFLOWS / "z_image_turbo_img2img.json"
INPAINT = WORKFLOWS / "z_image_turbo_inpaint.json"
BATCH = WORKFLOWS / "z_image_turbo_seed_variations.json"
LORA_CORE = WORKFLOWS / "z_image_turbo_lora_core_nodes.json"
ENHANCED_PROMPT = WORKFLOWS / "z_image_turbo_enhanced_prompt.json"
CONTROLNET_CANNY = WORKFLOWS / "z_image_turbo_controlnet_canny.json"
CONTROLNET_INPAINT = WORKFLOWS / "z_image_turbo_controlnet_inpaint.json"
DEMO_LORA = DEMO_FILES["loras"]  # written by write_demo_models
# A second demo LoRA: kohya/musubi names (split q/k/v, alpha) with a Qwen3 text-encoder part.
DEMO_LORA_KOHYA = "zimage_demo_random_lora_kohya_te.safetensors"
TWO_LORAS = WORKFLOWS / "z_image_turbo_two_loras.json"
BASE_T2I = WORKFLOWS / "z_image_base_text_to_image.json"
BASE_DISTILL_LORA = WORKFLOWS / "z_image_base_distill_lora.json"
OMNI_EDIT = WORKFLOWS / "z_image_omni_reference_edit.json"
GGUF_T2I = WORKFLOWS / "z_image_turbo_gguf.json"
SOURCE_IMAGE = "zimage_test_source.png"
LOADER_INPUTS = {
    "ZImageModelLoader": ("model_name", "diffusion_models"),
    "ZImageTextEncoderLoader": ("text_encoder_name", "text_encoders"),
    "ZImageVAELoader": ("vae_name", "vae"),
    "ZImageControlNetLoader": ("control_net_name", "model_patches"),
}

_instance: HeadlessComfyUI | None = None
_models: Path | None = None


def require_comfyui() -> None:
    comfyui_reference.note_use()
    if not (default_comfyui_dir() / "execution.py").is_file():
        pytest.fail(f"no ComfyUI at {default_comfyui_dir()}: run scripts/setup.sh first "
                    "(the README's test command does)")


def session_dir(name: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"zimage-{name}-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def demo_models() -> Path:
    """A models folder with the demo checkpoints, written once per session (tests may add files)."""
    global _models
    if _models is None:
        _models = session_dir("models")
        write_demo_models(_models)
        write_lora(_models / "loras" / DEMO_LORA_KOHYA, {
            **random_lora_state_dict(DEMO_TRANSFORMER, dialect="kohya", scale=0.5, seed=4, alpha=2.0),
            **random_text_encoder_lora_state_dict(demo_text_encoder_lora_targets(), dialect="kohya", scale=0.5,
                                                  seed=5, alpha=2.0)})
    return _models


def comfy() -> HeadlessComfyUI:
    """The session's in-process ComfyUI with the demo models in its model folders."""
    global _instance
    comfyui_reference.note_use()
    if _instance is None:
        require_comfyui()
        _instance = HeadlessComfyUI(demo_models(), session_dir("comfy-test")).start()
        _write_source_image(_instance.input_dir / SOURCE_IMAGE)
    return _instance


def _write_source_image(path: Path, width: int = 80, height: int = 72) -> None:
    """A deterministic test picture (sides deliberately not multiples of 16: VAEEncode must crop)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 64 * 4], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def demo_prompt(workflow: Path, *, width: int | None = None, height: int | None = None,
                batch_size: int | None = None, seed: int | None = None, **overrides) -> dict:
    """A shipped UI workflow converted to API format, pointed at the demo files and shrunk."""
    c = comfy()
    prompt = c.to_api(load_workflow(workflow))
    demo_loras = iter([DEMO_LORA, DEMO_LORA_KOHYA] * len(prompt))  # stacked LoRA nodes get different files
    for _, node in sorted(prompt.items(), key=lambda item: (len(item[0]), item[0])):
        kind, inputs = node["class_type"], node["inputs"]
        if kind in LOADER_INPUTS:
            name, folder = LOADER_INPUTS[kind]
            inputs[name] = DEMO_FILES[folder]
        if kind == "ZImageEmptyLatent":
            inputs["preset"] = "custom"
            inputs["width"] = width or inputs["width"]
            inputs["height"] = height or inputs["height"]
            inputs["batch_size"] = batch_size or inputs["batch_size"]
        if kind == "LoadImage":
            inputs["image"] = SOURCE_IMAGE
        if kind == "LoraLoaderModelOnly":
            inputs["lora_name"] = DEMO_LORA
        if kind == "ZImageLoraLoader":
            inputs["lora_name"] = next(demo_loras)
        if kind in ("ZImageTurboSampler", "ZImageImg2ImgSampler", "KSampler") and seed is not None:
            inputs["seed"] = seed
        for key, value in overrides.items():
            cls, _, inp = key.partition("__")
            if kind == cls:
                inputs[inp] = value
    return prompt


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [nid for nid, n in prompt.items() if n["class_type"] == class_type]


def run_ok(prompt: dict) -> RunResult:
    result = comfy().run(copy.deepcopy(prompt))
    assert result.ok, f"workflow failed: {result.error_message}"
    return result


def fresh_run(prompt: dict) -> RunResult:
    """Run with ComfyUI's output cache cleared, so every node really executes again."""
    comfy().executor.reset()
    return run_ok(prompt)


def add_save_latent(prompt: dict, source_node: str, prefix: str = "latents/test") -> str:
    """Attach ComfyUI's own SaveLatent to a node's LATENT output; returns the new node id."""
    node_id = str(max(int(k) for k in prompt) + 100)
    prompt[node_id] = {"class_type": "SaveLatent", "inputs": {"samples": [source_node, 0], "filename_prefix": prefix}}
    return node_id


def saved_latents(result: RunResult) -> list:
    """Tensors written by SaveLatent nodes of a run (read back with safetensors, as LoadLatent does)."""
    from safetensors.torch import load_file

    out = []
    for node_output in result.outputs.values():
        for item in node_output.get("latents", []):
            path = comfy().output_dir / item["subfolder"] / item["filename"]
            out.append(load_file(str(path))["latent_tensor"])
    return out


def saved_images(result: RunResult) -> list:
    """The PNGs a run saved, as uint8 arrays (H, W, 3), in output-node order."""
    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(p).convert("RGB")) for p in result.images(comfy().output_dir)]


def comfy_module(name: str):
    """A ComfyUI top-level module (nodes, execution, ...), imported after ComfyUI is booted so the name
    resolves to ComfyUI's module and not to a same-named folder of this checkout (our `nodes/`)."""
    import importlib

    comfy()
    return importlib.import_module(name)


def patched_weights(patcher) -> dict:
    """The diffusion model's weights as ComfyUI computes them when it loads this MODEL for sampling (its
    own load_models_gpu: patches applied), then unloaded again (which restores the weights)."""
    mm = comfy_module("comfy.model_management")
    mm.load_models_gpu([patcher], force_full_load=True)
    try:
        return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    finally:
        mm.unload_all_models()
