"""Read a LoRA file's keys: which trainer wrote it, where each module lands on Z-Image, what is left over.

`plan_lora` is pure key and shape logic (no weights are touched): it returns, per component, the map
from the file's module names to the host's weight keys (with a row range for q/k/v into the fused qkv),
in the form ComfyUI's `comfy.lora.load_lora(lora, to_load)` takes, and a `LoraReport`. A file that is
not a Z-Image LoRA raises `NotZImageLoraError`, naming what it looks like.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..checks import short_repr
from .forms import ModuleWeights, group_modules
from .metadata import METADATA_KEY, metadata_alphas
from .report import LoraReport, ModuleHit
from .targets import (
    DIT_FLAT_PREFIXES,
    DIT_PREFIXES,
    TE_FLAT_PREFIXES,
    TE_PREFIXES,
    Target,
    text_encoder_layer,
    text_encoder_targets,
    transformer_targets,
)


class NotZImageLoraError(ValueError):
    """The file is not a LoRA for Z-Image (another model's, or no LoRA at all), or none of it can be applied
    (damaged weights, unusable metadata); the message names the file, the key or value, and the fix."""


# How each trainer spells module names; the first that fits a module names its dialect in the report.
_DIALECTS = (
    ("model.diffusion_model.", "ComfyUI (model.diffusion_model.)"),
    ("diffusion_model.", "ComfyUI (diffusion_model.)"),
    ("base_model.model.", "PEFT (base_model.model.)"),
    ("transformer.", "diffusers (transformer.)"),
    ("lora_unet__", "VideoX-Fun (lora_unet__)"),
    ("lora_unet_", "kohya / musubi (lora_unet_)"),
    ("lycoris_", "LyCORIS / SimpleTuner (lycoris_)"),
    ("lora_transformer_", "OneTrainer (lora_transformer_)"),
    ("text_encoders.", "ComfyUI text encoder (text_encoders.)"),
    ("text_encoder.", "diffusers text encoder (text_encoder.)"),
    ("lora_te", "kohya text encoder (lora_te_)"),
    ("", "DiffSynth (bare module names)"),
)

# Other models' LoRAs, recognised by their module names (checked when nothing, or almost nothing, fits).
_FOREIGN = (
    (re.compile(r"double_blocks|single_blocks|single_transformer_blocks"), "a FLUX.1 (or FLUX-style) LoRA"),
    (re.compile(r"joint_blocks|context_block"), "an SD3 LoRA"),
    (re.compile(r"lora_te2_|text_encoder_2|conditioner[._]embedders[._]1"), "an SDXL LoRA"),
    (re.compile(r"(down|up|input|output)_blocks|mid_block|middle_block"), "a Stable Diffusion 1.x/2.x/XL LoRA"),
    (re.compile(r"img_mod|txt_mod|img_mlp|txt_mlp"), "a Qwen-Image (or MMDiT) LoRA"),
    (re.compile(r"blocks[._]\d+[._](cross_attn|self_attn[._][qkvo][._])"), "a Wan video LoRA"),
    (re.compile(r"transformer_blocks"), "a LoRA for another DiT (transformer_blocks…)"),
    (re.compile(r"lora_te_text_model|text_model[._]encoder"), "a CLIP text-encoder LoRA (Stable Diffusion)"),
)


@dataclass
class LoraPlan:
    """Where a LoRA file's modules land, per component, and the report of it."""

    model_map: dict[str, str | tuple[str, tuple[int, int, int]]] = field(default_factory=dict)
    clip_map: dict[str, str | tuple[str, tuple[int, int, int]]] = field(default_factory=dict)
    report: LoraReport = field(default_factory=LoraReport)
    extra_alphas: dict[str, float] = field(default_factory=dict)  # `.alpha` keys from the file's metadata


def _dialect(name: str) -> str:
    for prefix, label in _DIALECTS:
        if name.startswith(prefix):
            if prefix == "diffusion_model." and re.search(r"\.to_(q|k|v|out)", name):
                return "ai-toolkit (diffusion_model., diffusers names)"
            return label
    return _DIALECTS[-1][1]


def _lookup(name: str, dit, te) -> Target | None:
    if dit is not None and (t := dit.lookup(name, DIT_PREFIXES, DIT_FLAT_PREFIXES)) is not None:
        return t
    if te is not None and (t := te.lookup(name, TE_PREFIXES, TE_FLAT_PREFIXES)) is not None:
        return t
    return None


def _looks_like_text_encoder(name: str) -> bool:
    return (name.startswith(("text_encoder", "lora_te")) or "self_attn" in name or ".mlp." in name
            or "_mlp_" in name)


def describe_foreign(keys: Sequence[str]) -> str | None:
    """What a non-Z-Image LoRA file looks like, from its key names (None: nothing recognised)."""
    for pattern, what in _FOREIGN:
        if any(pattern.search(k) for k in keys):
            return what
    return None


def plan_lora(shapes: Mapping[str, Sequence[int]], alphas: Mapping[str, float], *, name: str,
              model_shapes: Mapping[str, Sequence[int]] | None,
              clip_shapes: Mapping[str, Sequence[int]] | None = None,
              metadata: Mapping[str, str] | None = None) -> LoraPlan:
    """Map a LoRA file (its key → shape, and its `.alpha` values) onto a Z-Image model and text encoder.

    `model_shapes` / `clip_shapes`: the host's state-dict key → shape of the MODEL (transformer under
    `diffusion_model.`) and of the CLIP (Qwen3 `…layers.N.…`); None when that input is not connected.
    `metadata`: the file's safetensors metadata; a diffusers/PEFT config there gives the alpha of modules
    that have no `.alpha` tensor (`plan.extra_alphas`, to be added to the file's tensors before patching).
    Raises NotZImageLoraError when nothing fits and the file looks like another model's LoRA, or
    when it holds no LoRA weights at all.
    """
    modules, unknown = group_modules(shapes, alphas)
    try:
        extra = metadata_alphas(metadata, modules)
    except ValueError as e:
        raise NotZImageLoraError(f"LoRA {name}: {e}") from None
    if extra:
        modules, unknown = group_modules(shapes, {**alphas, **extra})
    dit = transformer_targets(model_shapes) if model_shapes is not None else None
    te, te_layers = text_encoder_targets(clip_shapes) if clip_shapes is not None else (None, 0)
    plan = LoraPlan(extra_alphas=extra)
    report = plan.report
    if extra:
        report.notes.append(f"alpha from the file's PEFT metadata ({METADATA_KEY}) for {len(extra)} modules")
    report.name = name
    report.total_keys = len(shapes)
    covered: dict[str, list[tuple[int, int, str]]] = {}  # host key → row ranges already patched
    # Split q/k/v first: a file holding both the fused qkv and its split rows (some trainers write both)
    # keeps the split ones, as diffusers does.
    order = sorted(modules, key=lambda m: (not re.search(r"to[._][qkv]$", m), m))
    for module in order:
        weights = modules[module]
        target = _lookup(module, dit, te)
        if target is None:
            reason = _why_unmatched(module, model_shapes is None, clip_shapes is None, te_layers)
            report.add_unmatched(weights.keys, reason)
            continue
        problem = _shape_problem(weights, target)
        if problem:
            report.add_unmatched(weights.keys, problem)
            continue
        start, length = target.rows if target.rows else (0, target.shape[0] if target.shape else 0)
        clash = next((m for s, n, m in covered.get(target.key, []) if s < start + length and start < s + n), None)
        if clash is not None:
            report.add_unmatched(weights.keys, f"duplicate of {clash} (same weight), skipped")
            continue
        covered.setdefault(target.key, []).append((start, length, module))
        dest = (target.key, (0, *target.rows)) if target.rows else target.key
        (plan.model_map if target.component == "transformer" else plan.clip_map)[module] = dest
        report.add_hit(ModuleHit(target.component, target.module, target.part, weights.form, weights.rank,
                                 weights.alpha, weights.scale, len(weights.keys), _dialect(module)))
    if unknown:
        report.add_unmatched(unknown, "not a LoRA weight (unknown key form)")
    _refuse_foreign(plan, shapes, name)
    return plan


def _why_unmatched(module: str, no_model: bool, no_clip: bool, te_layers: int) -> str:
    if _looks_like_text_encoder(module):
        if no_clip:
            return "text-encoder weights: no CLIP connected, not applied"
        layer = text_encoder_layer(module)
        if layer is not None and te_layers and layer >= te_layers:
            return ("text encoder's last layer(s): Z-Image reads the second-to-last layer's output, so "
                    "these change nothing")
        if re.search(r"(^|[._])norm$|lm_head|embed_tokens", module):
            return "text encoder's final norm / embeddings / head: not patched"
        return "no such text-encoder weight"
    if no_model:
        return "transformer weights: no MODEL connected"
    return "no such Z-Image weight"


def _shape_problem(weights: ModuleWeights, target: Target) -> str:
    damaged = weights.problem()
    if damaged:
        return damaged
    delta = weights.delta_shape()
    if delta is None:
        return f"incomplete {weights.form} (parts present: {', '.join(sorted(weights.shapes))})"
    want = target.shape
    if tuple(delta) != tuple(want) and not (len(want) == 2 and tuple(delta[:2]) == tuple(want) and
                                            all(d == 1 for d in delta[2:])):
        return f"shape {tuple(delta)} does not fit {target.module} {tuple(want)}"
    return ""


def _refuse_foreign(plan: LoraPlan, shapes: Mapping[str, Sequence[int]], name: str) -> None:
    report = plan.report
    applied = report.matched_keys
    if applied and applied >= 0.5 * report.total_keys:
        return
    damaged = [r for r in report.unmatched_reasons() if r.startswith("damaged: ")]
    if applied == 0 and damaged:
        key = short_repr(report.unmatched[damaged[0]][0])
        raise NotZImageLoraError(
            f"LoRA {name} cannot be applied: module {key}: {damaged[0][len('damaged: '):]}"
            + (f" (and {len(damaged) - 1} more kinds of damage)" if len(damaged) > 1 else "")
            + ". The file is damaged or was written by a broken exporter: download it again, or export it again "
            "from the trainer.")
    keys = list(shapes)
    foreign = describe_foreign(keys)
    if applied == 0 or foreign is not None:
        if not shapes:
            what = "an empty file (no tensors)"
        elif foreign is not None:
            what = foreign
        elif all(r.startswith("shape ") for r in report.unmatched_reasons()):
            what = f"a LoRA for a model of another size ({report.first_shape_problem()})"
        elif not any(True for _ in report.hits) and report.only_unknown_forms():
            what = "no LoRA weights (no lora_up/lora_down, lora_A/lora_B, LoHa or LoKr tensors)"
        else:
            what = "a LoRA whose module names are not Z-Image's"
        reasons = report.unmatched_reasons()
        if applied == 0 and reasons and all("no CLIP connected" in r for r in reasons):
            raise NotZImageLoraError(
                f"LoRA {name}: it only holds text-encoder (Qwen3) weights. Connect the CLIP input "
                "(ZImageTextEncoderLoader) to apply it.")
        if applied == 0 and reasons and all("no MODEL connected" in r for r in reasons):
            raise NotZImageLoraError(f"LoRA {name}: it holds transformer weights; connect the MODEL input.")
        examples = ", ".join(short_repr(k) for k in sorted(keys)[:3])
        raise NotZImageLoraError(
            f"LoRA {name} is not a Z-Image LoRA: it looks like {what}; {applied} of {len(keys)} keys fit "
            f"Z-Image (e.g. {examples}). Nothing was applied. Pick a LoRA trained for Z-Image / "
            "Z-Image-Turbo, or load this one with the model it was made for.")
