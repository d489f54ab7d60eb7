"""The names trainers give the weights of Z-Image's transformer and Qwen3 text encoder, mapped onto ours.

A target is a weight of the loaded model (a key of its state dict, as the host patches it), or a row
range of one: diffusers, PEFT, kohya and ai-toolkit split the fused `attention.qkv` into to_q/to_k/to_v,
whose changes land on rows [0, d), [d, 2d), [2d, 3d) of ours. The transformer's own renaming
(diffusers ↔ ComfyUI) is owned by `zimage_core.transformer.comfy_key_for_diffusers`; here it is only
looked up, in dotted and in kohya's underscored spelling.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..transformer import DIFFUSERS_QKV, comfy_key_for_diffusers

DIT_ROOT = "diffusion_model."  # where the host's model keeps the transformer's weights
# How trainers prefix the transformer's module names (dotted spelling); "" = DiffSynth's bare names.
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.transformer.", "transformer.",
                "base_model.model.", "unet.", "")
# ... and in kohya's / LyCORIS' underscored spelling; VideoX-Fun (alibaba-pai's Fun LoRAs, e.g. the
# Z-Image-Fun-Lora-Distill files) writes kohya's with a double underscore, `lora_unet__layers_0_…`.
DIT_FLAT_PREFIXES = ("lora_unet__", "lora_unet_", "lycoris_", "lora_transformer_")
# Text encoder: ComfyUI's names, diffusers/PEFT's, kohya's.
TE_PREFIXES = ("text_encoders.qwen3_4b.transformer.model.", "text_encoders.qwen3_4b.transformer.",
               "text_encoders.model.", "text_encoders.", "text_encoder.model.", "text_encoder.",
               "base_model.model.model.", "base_model.model.", "model.", "")
TE_FLAT_PREFIXES = ("lora_te1_model_", "lora_te_model_", "lora_te1_", "lora_te_")
# Reverse of the transformer loader's diffusers renames: candidate diffusers names, each confirmed by
# comfy_key_for_diffusers before it is used.
_DIFFUSERS_SPELLINGS = (("x_embedder", "all_x_embedder.2-1"), ("final_layer.", "all_final_layer.2-1."),
                        (".attention.out", ".attention.to_out.0"), (".attention.q_norm", ".attention.norm_q"),
                        (".attention.k_norm", ".attention.norm_k"))
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """Where one module of a LoRA file lands."""

    component: str  # "transformer" or "text encoder"
    key: str  # the host's state-dict key of the weight patched
    module: str  # our module name (for the report), e.g. "layers.0.attention.qkv"
    shape: tuple[int, ...]  # shape of the patched part (rows narrowed)
    rows: tuple[int, int] | None = None  # (start, length) on dim 0, for q/k/v into the fused qkv
    part: str = ""  # "q", "k", "v" for a fused-qkv slice


def _flat(name: str) -> str:
    return name.replace(".", "_")


class TargetTable:
    """Aliases (dotted and underscored) of every patchable weight of one component."""

    def __init__(self, component: str) -> None:
        self.component = component
        self.dotted: dict[str, Target] = {}
        self.flat: dict[str, Target] = {}

    def add(self, alias: str, target: Target) -> None:
        self.dotted.setdefault(alias, target)
        self.flat.setdefault(_flat(alias), target)

    def lookup(self, name: str, prefixes: Sequence[str], flat_prefixes: Sequence[str]) -> Target | None:
        for p in flat_prefixes:
            if name.startswith(p) and (t := self.flat.get(name[len(p):])) is not None:
                return t
        for p in prefixes:
            if name.startswith(p) and (t := self.dotted.get(name[len(p):])) is not None:
                return t
        return None


def transformer_targets(model_shapes: Mapping[str, Sequence[int]]) -> TargetTable:
    """Every `diffusion_model.*.weight` of the host's model under its ComfyUI and diffusers names."""
    table = TargetTable("transformer")
    for key, shape in model_shapes.items():
        if not (key.startswith(DIT_ROOT) and key.endswith(".weight")):
            continue
        module = key[len(DIT_ROOT):-len(".weight")]
        shape = tuple(shape)
        table.add(module, Target("transformer", key, module, shape))
        if module.endswith(".attention.qkv") and len(shape) == 2 and shape[0] % 3 == 0:
            rows = shape[0] // 3
            base = module[: -len("qkv")]
            for i, proj in enumerate(DIFFUSERS_QKV):
                alias = base + proj
                if comfy_key_for_diffusers(alias + ".weight") == (module + ".weight", i):
                    table.add(alias, Target("transformer", key, module, (rows, *shape[1:]), (i * rows, rows),
                                            "qkv"[i]))
        for ours, theirs in _DIFFUSERS_SPELLINGS:
            if ours in module:
                alias = module.replace(ours, theirs)
                if comfy_key_for_diffusers(alias + ".weight") == (module + ".weight", None):
                    table.add(alias, Target("transformer", key, module, shape))
    return table


def text_encoder_targets(clip_shapes: Mapping[str, Sequence[int]]) -> tuple[TargetTable, int]:
    """Every Qwen3 layer weight of the host's CLIP under `layers.N.…` (the prefixes are the trainers');
    also returns how many decoder layers the encoder runs (Z-Image reads the second-to-last layer's output,
    so the last layer is not loaded, and LoRA weights for it change nothing)."""
    table = TargetTable("text encoder")
    n_layers = 0
    for key, shape in clip_shapes.items():
        m = _LAYER_RE.search(key)
        if m is None or not key.endswith(".weight"):
            continue
        n_layers = max(n_layers, int(m.group(1)) + 1)
        module = key[m.start() + (1 if key[m.start()] == "." else 0):-len(".weight")]
        table.add(module, Target("text encoder", key, module, tuple(shape)))
    return table, n_layers


def text_encoder_layer(name: str) -> int | None:
    """The Qwen3 layer index a (dotted or underscored) text-encoder module name refers to."""
    m = re.search(r"(?:^|[._])layers[._](\d{1,6})[._]", name)  # no int() of a 5000-digit index
    return int(m.group(1)) if m else None
