"""ZImageLoraLoader: a LoRA file of any trainer's dialect onto a Z-Image MODEL (and CLIP), with a report.

zimage_core.lora decides where each of the file's modules lands (pure key/shape logic); ComfyUI's own
weight adapters (LoRA, LoHa, LoKr, DoRA, diffs: `comfy.lora.load_lora`) build the patches from that map,
and `add_patches` on clones applies them: the LoRA stacks with other LoRA nodes (ours and ComfyUI's),
is computed when ComfyUI loads the model (in float32, then stored in the weight's dtype) and is undone
exactly when ComfyUI unpatches it.
"""

from __future__ import annotations

import logging
import os

import comfy.lora
import comfy.utils
import folder_paths
import torch

from ..zimage_core.checkpoint import model_fingerprint
from ..zimage_core.lora import STRENGTH_LIMIT, NotZImageLoraError, plan_lora
from .core_model import is_zimage_model
from .errors import check_widgets

log = logging.getLogger("ComfyUI-ZImage")
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for name, m in module.named_modules():  # GGUF layers store bytes: the weight's own shape (nodes/gguf.py)
        if getattr(m, "gguf_type", None) is not None:
            shapes[f"{name}.weight" if name else "weight"] = tuple(m.gguf_shape)
    return shapes


def _fp8_note(model, targets) -> str | None:
    """What re-quantizing fp8 weights after patching costs in precision (the report's error bound)."""
    sd = model.model.state_dict()
    fp8 = [k for k in {t if isinstance(t, str) else t[0] for t in targets} if sd.get(k) is not None
           and sd[k].dtype in FP8]
    if not fp8:
        return None
    # Per-row scales are our fp8_e4m3fn_fast layers; ComfyUI's (comfy_quant) fp8 layers have one per tensor.
    rows = [k for k in fp8 if k.endswith(".weight") and (scale := sd.get(k[:-len("weight")] + "weight_scale")) is not None
            and scale.numel() > 1]
    text = (f"fp8: {len(fp8)} patched weights are stored in float8_e4m3fn. Each is patched in float32 and stored "
            "back in fp8: ")
    if rows:
        text += ("fp8_e4m3fn_fast rounds to nearest with the layer's per-row scale (error <= 2^-4 = 6.25% of a "
                 "weight, or 2^-10 x row scale near zero; values beyond the row's range, 448 x row scale, are "
                 "clipped)")
    if len(rows) < len(fp8):
        text += ("; " if rows else "") + ("ComfyUI rounds stochastically (unbiased; error < one fp8 step: < 2^-3 = "
                                          "12.5% of a weight, or < 2^-9 near zero)")
    return text + ". Use bf16 weights for an exact LoRA."


class ZImageLoraLoader:
    DESCRIPTION = ("Applies a LoRA to a Z-Image model (and optionally its Qwen3 text encoder). Reads every trainer's "
                   "key names: ComfyUI (diffusion_model.), diffusers/PEFT (transformer., base_model.model.), "
                   "kohya/musubi (lora_unet_ with .alpha), DiffSynth (bare names), ai-toolkit, LyCORIS (lycoris_), "
                   "as LoRA, LoHa or LoKr; split to_q/to_k/to_v land on the fused qkv rows. Stacks with other LoRA "
                   "nodes. The report output (also shown on the node and in the log) lists what was matched, what "
                   "was not, rank and effective scale. A LoRA for another model is refused with a message.")
    CATEGORY = "Z-Image/loaders"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    OUTPUT_TOOLTIPS = ("The model with the LoRA (a patched clone; the input model is unchanged).",
                       "The text encoder with the LoRA's text-encoder part (None when no CLIP is connected).",
                       "What was applied: keys matched and not matched, modules covered, rank, effective scale.")
    FUNCTION = "load"

    def __init__(self) -> None:
        self._cached: tuple[str, float, tuple[dict, dict]] | None = None

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Z-Image model (ZImageModelLoader or UNETLoader), LoRAs may "
                                               "already be applied."}),
                "lora_name": (folder_paths.get_filename_list("loras"),
                              {"tooltip": "A Z-Image LoRA (.safetensors) in models/loras, of any trainer."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -STRENGTH_LIMIT, "max": STRENGTH_LIMIT, "step": 0.01,
                                             "tooltip": "How strongly the LoRA changes the diffusion model "
                                                        "(multiplies alpha/rank; 0 = no change; may be negative)."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The Z-Image text encoder, for LoRAs that also train it (Qwen3)."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -STRENGTH_LIMIT, "max": STRENGTH_LIMIT, "step": 0.01,
                                            "tooltip": "How strongly the LoRA changes the text encoder."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name: str):
        # Checked when the prompt is queued. Only lora_name is named here: ComfyUI skips its own checks (list,
        # min/max) for every input this signature names, so the strengths keep ComfyUI's bounds checks.
        if not lora_name.lower().endswith(".safetensors"):
            return (f"ZImageLoraLoader: {lora_name} is not a .safetensors file. Only safetensors LoRAs are read "
                    "(pickle files can run code); convert it or pick a .safetensors LoRA.")
        if lora_name not in folder_paths.get_filename_list("loras"):
            return f"ZImageLoraLoader: no LoRA {lora_name!r} in models/loras. Put the file there and refresh."
        return True

    @classmethod
    def IS_CHANGED(cls, lora_name: str, **_) -> str:
        """A LoRA file replaced on disk under the same name is read again on the next queue."""
        try:
            return model_fingerprint(folder_paths.get_full_path_or_raise("loras", lora_name))
        except Exception:  # noqa: BLE001 - an unknown name: VALIDATE_INPUTS / load report it
            return "missing"

    def _read(self, path: str) -> tuple[dict[str, torch.Tensor], dict]:
        stamp = os.path.getmtime(path)
        if self._cached is not None and self._cached[:2] == (path, stamp):
            return self._cached[2]
        try:
            lora, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
        except Exception as e:  # noqa: BLE001 - a broken file: say which, and what to do
            raise ValueError(f"ZImageLoraLoader: cannot read {path} as safetensors ({e}). The file is damaged or "
                             "not a LoRA; download it again.") from e
        self._cached = (path, stamp, (lora, metadata or {}))
        return lora, metadata or {}

    def load(self, model, lora_name: str, strength_model: float = 1.0, clip=None, strength_clip: float = 1.0):
        check_widgets(type(self), strength_model=strength_model, strength_clip=strength_clip)
        if not is_zimage_model(model):
            name = type(getattr(model, "model", model)).__name__
            raise ValueError(f"ZImageLoraLoader: this MODEL ({name}) is not a Z-Image model. Use ComfyUI's "
                             "LoraLoader for other models.")
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        lora, metadata = self._read(path)
        alphas = {k: float(v.item()) for k, v in lora.items() if k.endswith(".alpha") and v.numel() == 1}
        clip_shapes = _shapes(clip.patcher.model) if clip is not None else None
        try:
            plan = plan_lora({k: tuple(v.shape) for k, v in lora.items()}, alphas, name=lora_name,
                             model_shapes=_shapes(model.model), clip_shapes=clip_shapes, metadata=metadata)
        except NotZImageLoraError as e:
            raise ValueError(f"ZImageLoraLoader: {e}") from None
        report = plan.report
        if plan.extra_alphas:  # PEFT's alpha from the metadata, as ComfyUI's adapters read it (a new dict)
            lora = {**lora, **{k: torch.tensor(v) for k, v in plan.extra_alphas.items()}}
        new_model, new_clip = model, clip
        if plan.model_map and strength_model != 0:  # strength 0: the input model itself, bit for bit
            new_model = model.clone()
            self._patch(new_model, lora, plan.model_map, strength_model, report, "transformer")
            if (note := _fp8_note(model, plan.model_map.values())) is not None:
                report.notes.append(note)
        if clip is not None and plan.clip_map and strength_clip != 0:
            new_clip = clip.clone()
            self._patch(new_clip, lora, plan.clip_map, strength_clip, report, "text encoder")
        text = report.text(strength_model, strength_clip if clip is not None else 0.0)
        log.info("ZImageLoraLoader:\n%s", text)
        return {"ui": {"text": [text]}, "result": (new_model, new_clip, text)}

    @staticmethod
    def _patch(target, lora: dict, key_map: dict, strength: float, report, component: str) -> None:
        patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
        applied = set(target.add_patches(patches, strength))
        missing = [m for m, dest in key_map.items() if dest not in applied]
        if missing:  # the plan said these fit; ComfyUI's adapters could not build or place them
            report.notes.append(f"{component}: {len(missing)} modules could not be applied by ComfyUI's weight "
                                f"adapters (e.g. {missing[0]}).")
