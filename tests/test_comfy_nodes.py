"""The pack inside a real ComfyUI: loading through ComfyUI's custom-node loader, node definitions, and the
shipped UI workflows converting to valid API prompts."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.comfy_harness import (
    BASE_DISTILL_LORA,
    BASE_T2I,
    BATCH,
    CONTROLNET_CANNY,
    CONTROLNET_INPAINT,
    ENHANCED_PROMPT,
    GGUF_T2I,
    IMG2IMG,
    INPAINT,
    LORA_CORE,
    OMNI_EDIT,
    T2I,
    TWO_LORAS,
    WORKFLOWS,
    comfy_module,
    demo_prompt,
)

NODE_IDS = ["ZImageModelLoader", "ZImageTextEncoderLoader", "ZImageVAELoader", "ZImageTextEncode",
            "ZImageEmptyLatent", "ZImageTurboSampler", "ZImageImg2ImgSampler", "ZImageVAEEncode",
            "ZImageVAEDecode", "ZImageCompileModel", "ZImageCompileVAE", "ZImageInpaintMask",
            "ZImageInpaintComposite", "ZImagePromptEnhancer", "ZImageControlNetLoader", "ZImageControlNetApply",
            "ZImageSeedVariety", "ZImageLoraLoader", "ZImageCFGOptions", "ZImageParallel"]
EXPECTED_INPUTS = {
    "ZImageModelLoader": {"model_name", "weight_dtype"},
    "ZImageTextEncoderLoader": {"text_encoder_name"},
    "ZImageVAELoader": {"vae_name"},
    "ZImageTextEncode": {"text_encoder", "text"},
    "ZImageEmptyLatent": {"width", "height", "preset", "batch_size"},
    "ZImageTurboSampler": {"model", "positive", "latent", "seed", "steps", "shift", "guidance", "negative", "mask",
                           "on_nan", "cfg_normalization", "cfg_truncation", "preset"},
    "ZImageImg2ImgSampler": {"model", "positive", "latent", "strength", "seed", "steps", "shift", "mask", "on_nan",
                             "negative", "guidance", "cfg_normalization", "cfg_truncation", "preset"},
    "ZImageCFGOptions": {"model", "cfg_normalization", "cfg_truncation"},
    "ZImageSeedVariety": {"model", "strength", "end"},
    "ZImageVAEEncode": {"vae", "image"},
    "ZImageVAEDecode": {"vae", "latent"},
    "ZImageCompileModel": {"model", "mode"},
    "ZImageCompileVAE": {"vae"},
    "ZImageInpaintMask": {"mask", "grow", "feather", "image"},
    "ZImageInpaintComposite": {"source", "generated", "mask"},
    "ZImagePromptEnhancer": {"text", "mode", "seed", "max_new_tokens", "temperature", "clip", "text_encoder_name"},
    "ZImageControlNetLoader": {"control_net_name"},
    "ZImageControlNetApply": {"model", "controlnet", "vae", "strength", "start_percent", "end_percent", "reference",
                              "image", "inpaint_image", "mask"},
    "ZImageLoraLoader": {"model", "lora_name", "strength_model", "clip", "strength_clip"},
    "ZImageParallel": {"model", "gpus", "mode", "timeout_s"},
}


def test_pack_loads_through_comfyui_custom_node_loader():
    nodes = comfy_module("nodes")
    for node_id in NODE_IDS:
        assert node_id in nodes.NODE_CLASS_MAPPINGS, f"{node_id} not registered by ComfyUI"
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        # Registered by ComfyUI's loader from the custom_nodes folder, not imported by this test.
        assert cls.RELATIVE_PYTHON_MODULE == "custom_nodes.ComfyUI-ZImage"
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("Z-Image")
    assert "ComfyUI-ZImage" in nodes.LOADED_MODULE_DIRS
    assert nodes.EXTENSION_WEB_DIRS["ComfyUI-ZImage"].endswith("web")


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_definition(node_id):
    nodes = comfy_module("nodes")
    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    spec = cls.INPUT_TYPES()
    inputs = {**spec.get("required", {}), **spec.get("optional", {})}
    assert set(inputs) == EXPECTED_INPUTS[node_id]
    for name, entry in inputs.items():
        assert len(entry) > 1 and entry[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert cls.CATEGORY.startswith("Z-Image")
    assert cls.DESCRIPTION
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)


def test_loaders_list_files_from_comfyui_model_folders():
    nodes = comfy_module("nodes")
    for node_id, name, file in [("ZImageModelLoader", "model_name", "zimage_demo_random_dit.safetensors"),
                                ("ZImageTextEncoderLoader", "text_encoder_name", "zimage_demo_random_qwen3.safetensors"),
                                ("ZImageVAELoader", "vae_name", "zimage_demo_random_ae.safetensors")]:
        choices = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"][name][0]
        assert file in choices


def test_core_types_fit_between_our_nodes():
    nodes = comfy_module("nodes")
    m = nodes.NODE_CLASS_MAPPINGS
    assert m["ZImageTextEncode"].RETURN_TYPES == ("CONDITIONING",)
    assert m["ZImageEmptyLatent"].RETURN_TYPES == ("LATENT",)
    assert m["ZImageTurboSampler"].RETURN_TYPES == ("LATENT",)
    assert m["ZImageVAEDecode"].RETURN_TYPES == ("IMAGE",)
    assert m["ZImageVAEEncode"].INPUT_TYPES()["required"]["image"][0] == "IMAGE"


@pytest.mark.parametrize("workflow", [T2I, IMG2IMG, INPAINT, BATCH, ENHANCED_PROMPT], ids=lambda p: p.stem)
def test_shipped_ui_workflow_converts_and_validates(workflow):
    execution = comfy_module("execution")
    ui = json.loads(workflow.read_text())
    assert ui["version"] == 0.4 and ui["links"] and ui["nodes"]
    notes = [n for n in ui["nodes"] if n["type"] in ("MarkdownNote", "Note")]
    assert notes, "each workflow names its model files in a note"
    text = " ".join(str(v) for n in notes for v in n["widgets_values"])
    for file, folder in [("z_image_turbo_bf16.safetensors", "diffusion_models"),
                         ("qwen_3_4b.safetensors", "text_encoders"), ("ae.safetensors", "vae")]:
        assert file in text and f"models/{folder}" in text
    prompt = demo_prompt(workflow, width=64, height=64)
    assert all(not n["class_type"].endswith("Note") for n in prompt.values())
    valid = asyncio.run(execution.validate_prompt("validate-" + workflow.stem, prompt, None))
    assert valid[0], f"{workflow.name}: {valid[1]} {valid[3]}"


def test_t2i_workflow_widget_values_land_on_the_right_inputs():
    prompt = demo_prompt(T2I)
    sampler = next(n for n in prompt.values() if n["class_type"] == "ZImageTurboSampler")["inputs"]
    # widgets_values [seed, control_after_generate, steps, shift, guidance]: the control value is skipped.
    assert (sampler["seed"], sampler["steps"], sampler["shift"], sampler["guidance"]) == (42, 8, 3.0, 0.0)
    latent = next(n for n in prompt.values() if n["class_type"] == "ZImageEmptyLatent")["inputs"]
    ui_latent = next(n for n in json.loads(T2I.read_text())["nodes"] if n["type"] == "ZImageEmptyLatent")
    assert ui_latent["widgets_values"][:2] == [1024, 1024]
    assert latent["batch_size"] == 1
    assert isinstance(sampler["model"], list) and isinstance(sampler["positive"], list)


def test_workflows_are_in_the_folder_comfyui_template_browser_reads():
    # app/custom_node_manager.py serves <pack>/workflows/*.json (one of the folder names it reads, beside
    # example_workflows) at /api/workflow_templates/<pack>/ and lists them at /workflow_templates (checked
    # over HTTP in test_comfy_server).
    names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert WORKFLOWS.name == "workflows"
    assert names == sorted([T2I.stem, IMG2IMG.stem, INPAINT.stem, BATCH.stem, LORA_CORE.stem, ENHANCED_PROMPT.stem,
                            CONTROLNET_CANNY.stem, CONTROLNET_INPAINT.stem, TWO_LORAS.stem, BASE_T2I.stem,
                            BASE_DISTILL_LORA.stem, OMNI_EDIT.stem, GGUF_T2I.stem])
