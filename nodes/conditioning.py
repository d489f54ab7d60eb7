"""ZImageTextEncode: CLIPTextEncode for Z-Image, with the checks the core node lacks.

Any Z-Image CLIP works (ours from ZImageTextEncoderLoader, or ComfyUI's native one from CLIPLoader type
lumina2); the CONDITIONING is ComfyUI's native layout
`[[cond (1, L, 2560), {"pooled_output": None, "attention_mask": (1, L) long}]]`.
"""

from __future__ import annotations

NODE_CATEGORY = "Z-Image"


class ZImageTextEncode:
    DESCRIPTION = ("Encodes a prompt with Z-Image's Qwen3-4B text encoder (chat template, second-to-last "
                   "layer). Like CLIPTextEncode, plus a clear error for an empty prompt and a warning when the "
                   "prompt is longer than Z-Image reads (1504 tokens). The output is standard CONDITIONING.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The prompt's text features, for ZImageTurboSampler / ZImageImg2ImgSampler.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("CLIP", {"tooltip": "From ZImageTextEncoderLoader (Qwen3-4B), or CLIPLoader type "
                                                 "lumina2 with qwen_3_4b.safetensors."}),
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
        if not hasattr(text_encoder, "tokenize"):
            raise ValueError("ZImageTextEncode: text_encoder is not a text encoder (CLIP). Connect "
                             "ZImageTextEncoderLoader's output.")
        tokens = text_encoder.tokenize(text)
        return (text_encoder.encode_from_tokens_scheduled(tokens),)
