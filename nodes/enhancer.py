"""ZImagePromptEnhancer: a short idea -> a detailed prompt, generated offline by the Qwen3-4B text encoder.

Generation runs on the CLIP's own weights (zimage_core's encoder inside our core CLIP) plus the small
part the encoder never loads (last decoder layer and final norm, ~0.2 GB in bf16), read once from the
same file and kept beside that CLIP. Both are ComfyUI models: `load_models_gpu` puts them on the GPU,
unloading others if needed, exactly as for encoding.
"""

from __future__ import annotations

import logging
import weakref

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils

from ..zimage_core.checkpoint import model_fingerprint
from ..zimage_core.prompt_enhancer import MODES, enhance_prompt, prompt_ids
from ..zimage_core.text_encoder.generate import CausalLM, Sampling
from ..zimage_core.text_encoder.lm_tail import load_lm_tail
from .core_clip import ZImageClipModel, load_zimage_clip, text_encoder_compute_dtype
from .core_model import load_options
from .errors import check_widgets, load_explained
from .loaders import _choices, _resolve

log = logging.getLogger(__name__)

NODE_CATEGORY = "Z-Image"
USE_CLIP = "(use the clip input)"
# Qwen3's recommended sampling for non-thinking chat (temperature is the node's input).
TOP_K, TOP_P = 20, 0.8

_tails: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # encoder -> ModelPatcher of its LM tail
_file_clip: dict[str, object] = {}  # fingerprint -> CLIP, the last text-encoder file picked by name


class ZImagePromptEnhancer:
    DESCRIPTION = ("Turns a short idea (English or Chinese) into a detailed prompt with Z-Image's own text encoder, "
                   "Qwen3-4B, used as the chat model it is: offline, no extra download, on the weights already "
                   "loaded. Modes: enhance (adds subject, material, light, composition and style), translate to "
                   "English, quality boost (subject-aware details plus a negative prompt). The result is shown on "
                   "the node; connect it to the text input of ZImageTextEncode or CLIPTextEncode.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("prompt", "negative_prompt")
    OUTPUT_TOOLTIPS = ("The enhanced prompt, for the text input of ZImageTextEncode / CLIPTextEncode.",
                       "Quality boost only: a negative prompt for the subject (empty in the other modes). "
                       "Turbo ignores negatives at guidance 0; Z-Image Base uses them with CFG.")
    OUTPUT_NODE = True  # runs (and shows its text) even when nothing is connected to its outputs
    FUNCTION = "enhance"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                    "tooltip": "Your idea, a few words or sentences in English or Chinese. "
                                               "Text to appear in the image goes in quotes."}),
                "mode": (list(MODES), {"default": MODES[0], "tooltip":
                         "enhance: a precise visual prompt in the idea's language. translate to English: a "
                         "faithful translation (quoted text stays as written). quality boost: details for this "
                         "kind of subject plus a negative prompt."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seed of the sampling (unused at temperature 0). The same seed, "
                                            "idea and settings give the same text."}),
                "max_new_tokens": ("INT", {"default": 512, "min": 16, "max": 4096, "step": 16,
                                           "tooltip": "Longest answer in tokens (a token is about 3/4 of an "
                                                      "English word or 1-2 Chinese characters)."}),
                "temperature": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 2.0, "step": 0.05,
                                          "tooltip": "0: always the most likely words (deterministic, no seed). "
                                                     "0.7: Qwen3's recommended setting (with top-k 20, top-p "
                                                     "0.8). Higher: more varied."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The Z-Image text encoder from ZImageTextEncoderLoader. The "
                                             "enhancer then shares its weights: nothing is loaded twice."}),
                "text_encoder_name": ([USE_CLIP] + _choices("text_encoders", "text_encoder"), {
                    "default": USE_CLIP,
                    "tooltip": "Or a Qwen3-4B file (qwen_3_4b.safetensors) to load, when no clip is "
                               "connected. Prefer the clip input when the workflow also encodes with it."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, mode: str = MODES[0], text_encoder_name: str = USE_CLIP):
        if mode not in MODES:
            return f"mode must be one of {', '.join(MODES)}; got {mode!r}"
        if text_encoder_name != USE_CLIP and text_encoder_name not in _choices("text_encoders", "text_encoder"):
            return (f"text_encoder_name {text_encoder_name!r} is not in models/text_encoders; pick a file there or "
                    f"{USE_CLIP!r} and connect ZImageTextEncoderLoader's CLIP.")
        return True

    @classmethod
    def IS_CHANGED(cls, text_encoder_name: str = USE_CLIP, **_):
        # A file picked by name is loaded again when it changes on disk (as the loaders do).
        if text_encoder_name == USE_CLIP:
            return ""
        try:
            return model_fingerprint(_resolve("text_encoders", "text_encoder", text_encoder_name))
        except Exception:  # noqa: BLE001 - an unknown name: VALIDATE_INPUTS / enhance report it
            return "missing"

    def enhance(self, text: str, mode: str, seed: int, max_new_tokens: int, temperature: float, clip=None,
                text_encoder_name: str = USE_CLIP):
        check_widgets(type(self), max_new_tokens=max_new_tokens, temperature=temperature)
        if not text or not text.strip():
            raise ValueError("ZImagePromptEnhancer: the idea is empty. Type a few words about the picture you want "
                             "into the text box.")
        if clip is None:
            if text_encoder_name == USE_CLIP:
                raise ValueError("ZImagePromptEnhancer: no text encoder. Connect the CLIP of ZImageTextEncoderLoader "
                                 "to the clip input, or pick qwen_3_4b.safetensors in text_encoder_name.")
            clip = _clip_from_file(text_encoder_name)
        encoder = _encoder_of(clip)
        tail = _tail_of(clip, encoder)
        patcher = clip.patcher
        lm = CausalLM.from_encoder(encoder, tail.model, compute_dtype=text_encoder_compute_dtype(
            patcher.load_device, generating_from=encoder.dtype))
        prompt = prompt_ids(encoder.tokenizer, text, mode)  # instruction + idea: sized before loading
        getattr(clip.cond_stage_model, "wait_host_weights", lambda: None)()  # a background pin finishes first
        mm.load_models_gpu([patcher, tail], memory_required=lm.memory_required(len(prompt[0]) + int(max_new_tokens)))
        pbar = comfy.utils.ProgressBar(max_new_tokens)

        def on_token(i: int, _token: int) -> None:
            mm.throw_exception_if_processing_interrupted()
            pbar.update_absolute(i + 1, max_new_tokens)

        sampling = Sampling(temperature=float(temperature), top_k=TOP_K, top_p=TOP_P, seed=int(seed))
        result = enhance_prompt(lm, encoder.tokenizer, text, mode, max_new_tokens=int(max_new_tokens),
                                sampling=sampling, device=patcher.load_device, callback=on_token, prompt=prompt)
        g = result.generation
        log.info("ZImagePromptEnhancer: %d tokens in %.2f s (%.1f tokens/s%s), prompt %d tokens.",
                 len(g.token_ids), g.prefill_s + g.decode_s, g.tokens_per_s, ", CUDA graph" if g.cuda_graph else "",
                 g.prompt_tokens)
        if result.fell_back:
            log.warning("ZImagePromptEnhancer: the model returned no usable text (%r); passing the idea on unchanged.",
                        result.raw[:200])
        ui = {"text": [result.prompt]}
        if result.negative:
            ui["negative_prompt"] = [result.negative]
        return {"ui": ui, "result": (result.prompt, result.negative)}


def _encoder_of(clip):
    model = getattr(clip, "cond_stage_model", None)
    if not isinstance(model, ZImageClipModel):
        raise ValueError("ZImagePromptEnhancer: this CLIP is not from ZImageTextEncoderLoader (it is "
                         f"{type(model).__name__}). Load qwen_3_4b.safetensors with ZImageTextEncoderLoader, or pick "
                         "the file in text_encoder_name.")
    return model.encoder


def _tail_of(clip, encoder) -> comfy.model_patcher.ModelPatcher:
    """The LM tail of `encoder` as a ComfyUI model on the CLIP's devices: read from its file once."""
    patcher = _tails.get(encoder)
    if patcher is None:
        path = encoder.path
        tail = load_explained(
            lambda: load_lm_tail(path, len(encoder.model.layers), dtype=encoder.dtype, device=clip.patcher.offload_device,
                                 operations=comfy.ops.manual_cast, **load_options()),
            path, "the Qwen3-4B text encoder of Z-Image (qwen_3_4b.safetensors)",
            "Use the complete qwen_3_4b.safetensors from Comfy-Org/z_image_turbo (split_files/text_encoders).")
        tail.eval().requires_grad_(False)
        patcher = comfy.model_patcher.ModelPatcher(tail, load_device=clip.patcher.load_device,
                                                   offload_device=clip.patcher.offload_device)
        _tails[encoder] = patcher
    return patcher


def _clip_from_file(name: str):
    path = _resolve("text_encoders", "text_encoder", name)
    key = f"{path}|{model_fingerprint(path)}"
    clip = _file_clip.get(key)
    if clip is None:
        _file_clip.clear()  # one file at a time: a second 8 GB copy is never kept
        clip = _file_clip[key] = load_zimage_clip(path)
    return clip
