"""Z-Image-Turbo (S3-DiT, Qwen3-4B text encoder, FLUX VAE) in plain PyTorch, free of ComfyUI.

Public names are imported lazily so `import zimage_core` stays cheap and each part loads
only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "errors",
    "SamplingError": "errors",
    "open_checkpoint": "checkpoint",
    "model_fingerprint": "checkpoint",
    # transformer
    "ZImageTransformer": "transformer",
    "TransformerConfig": "transformer",
    "load_transformer": "transformer",
    # schedule and samplers
    "flow_sigmas": "sampling",
    "img2img_sigmas": "sampling",
    "denoise_sigmas": "sampling",
    "make_noise": "sampling",
    "sample_text_to_image": "sampling",
    "sample_img2img": "sampling",
    "sample_inpaint": "sampling",
    "latent_inpaint_mask": "sampling",
    "sample_euler": "sampling",
    "SeedVariety": "sampling",
    # text encoder
    "load_text_encoder": "text_encoder",
    "ZImageTextEncoder": "text_encoder",
    "load_tokenizer": "text_encoder",
    "QwenTokenizer": "text_encoder",
    "TokenizerNotFoundError": "text_encoder",
    # Fun ControlNet Union
    "load_controlnet": "controlnet",
    "ZImageControlNet": "controlnet",
    # the text encoder as a causal LM, and the prompt enhancer on it
    "CausalLM": "text_encoder",
    "load_lm_tail": "text_encoder",
    "enhance_prompt": "prompt_enhancer",
    # VAE
    "load_vae": "vae",
    "FluxVAE": "vae",
    "LATENT_SCALE": "vae",
    "LATENT_SHIFT": "vae",
    "normalize_latents": "vae",
    "denormalize_latents": "vae",
    "limit_decode_latents": "vae",
    # LoRA files of every dialect (key/shape logic)
    "plan_lora": "lora",
    "LoraPlan": "lora",
    "LoraReport": "lora",
    "NotZImageLoraError": "lora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'zimage_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
