"""ZImageTextEncode and the CONDITIONING layout shared with ComfyUI's own Z-Image text encoder.

ComfyUI's native Z-Image CLIP (comfy/text_encoders/z_image.py, via CLIPTextEncode) produces
`[[cond (1, L, 2560), {"pooled_output": None, "attention_mask": (1, L) long}]]`: the hidden states
of Qwen3's second-to-last layer for the chat-templated prompt. We emit the same layout, so our
sampler takes conditioning from either encoder and ComfyUI's KSampler takes ours.
"""

from __future__ import annotations

import torch

NODE_CATEGORY = "Z-Image"


def make_conditioning(features: torch.Tensor) -> list:
    """(L, D) caption features → one CONDITIONING entry in ComfyUI's layout."""
    cond = features.unsqueeze(0)
    mask = torch.ones(cond.shape[:2], dtype=torch.long, device=cond.device)
    return [[cond, {"pooled_output": None, "attention_mask": mask}]]


def conditioning_to_caption_features(conditioning, input_name: str, expected_dim: int | None = None
                                     ) -> list[torch.Tensor]:
    """CONDITIONING → zimage_core's caption list: one (L_i, D) tensor per entry, padding removed.

    ComfyUI pads only when several prompts are batched; its attention_mask marks the real tokens
    (Z-Image uses every template token of a prompt and nothing else).
    """
    if not conditioning:
        raise ValueError(f"{input_name}: the conditioning is empty. Connect a ZImageTextEncode "
                         "(or CLIPTextEncode with a Z-Image text encoder) output.")
    captions: list[torch.Tensor] = []
    for cond, extra in conditioning:
        if cond.ndim != 3:
            raise ValueError(f"{input_name}: expected text features shaped (batch, tokens, dim), got "
                             f"{tuple(cond.shape)}. Use a Z-Image text encoder (Qwen3-4B).")
        if expected_dim is not None and cond.shape[-1] != expected_dim:
            raise ValueError(
                f"{input_name}: the text features have width {cond.shape[-1]}, but this Z-Image model "
                f"expects {expected_dim} (Qwen3-4B gives 2560). The conditioning comes from a different "
                "text encoder: encode the prompt with qwen_3_4b.safetensors (ZImageTextEncoderLoader, or "
                "CLIPLoader type 'lumina2' + CLIPTextEncode).")
        mask = extra.get("attention_mask") if isinstance(extra, dict) else None
        for i in range(cond.shape[0]):
            feats = cond[i]
            if mask is not None:
                feats = feats[mask[min(i, mask.shape[0] - 1)].to(feats.device).bool()]
            if feats.shape[0] == 0:
                raise ValueError(f"{input_name}: a prompt encoded to zero tokens.")
            captions.append(feats)
    return captions


class ZImageTextEncode:
    DESCRIPTION = ("Encodes a prompt with Z-Image's Qwen3-4B text encoder (chat template, second-to-last "
                   "layer). The output is standard CONDITIONING, also accepted by ComfyUI's KSampler.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The prompt's text features, for ZImageTurboSampler / ZImageImg2ImgSampler.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("ZIMAGE_TEXT_ENCODER", {"tooltip": "From ZImageTextEncoderLoader (Qwen3-4B)."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "tooltip": "What the image should show. Z-Image follows long, detailed "
                                           "descriptions and renders quoted text (English and Chinese)."}),
        }}

    def encode(self, text_encoder, text: str):
        if not text or not text.strip():
            raise ValueError(
                "ZImageTextEncode: the prompt is empty. Z-Image-Turbo needs a description of the image to "
                "generate; type one into the text box. (Turbo needs no negative prompt: leave the "
                "sampler's negative input unconnected and guidance at 0.)")
        (features,) = text_encoder.encode([text])
        return (make_conditioning(features),)
