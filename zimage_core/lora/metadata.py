"""alpha from a diffusers/PEFT LoRA file's metadata: `save_lora_weights` stores PEFT's LoraConfig (lora_alpha,
r, patterns, rsLoRA) as JSON under "lora_adapter_metadata" instead of `.alpha` tensors. diffusers scales by
it; without it such a file would be applied at the wrong strength whenever lora_alpha != r."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from .forms import ModuleWeights

METADATA_KEY = "lora_adapter_metadata"


def _config(metadata: Mapping[str, str] | None, component: str) -> dict | None:
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    prefix = component + "."
    scoped = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
    return scoped or data  # a file of one component may store the config without the prefix


def _pattern_value(patterns: Mapping | None, module: str):
    for pattern, value in (patterns or {}).items():
        if module == pattern or module.endswith("." + pattern):
            return value
    return None


def metadata_alphas(metadata: Mapping[str, str] | None, modules: Mapping[str, ModuleWeights],
                    component: str = "transformer") -> dict[str, float]:
    """`{file module name + ".alpha": alpha}` for the LoRA modules without an `.alpha` tensor, such that
    alpha / rank (how ComfyUI's adapters scale) equals the PEFT config's scale for that module."""
    cfg = _config(metadata, component)
    if cfg is None or "lora_alpha" not in cfg:
        return {}
    out: dict[str, float] = {}
    for name, weights in modules.items():
        if weights.alpha is not None or not weights.form.startswith("LoRA") or weights.rank is None:
            continue
        plain = name.split(".", 1)[1] if name.startswith(component + ".") else name
        r = _pattern_value(cfg.get("rank_pattern"), plain) or cfg.get("r") or weights.rank
        alpha = _pattern_value(cfg.get("alpha_pattern"), plain) or cfg["lora_alpha"]
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[name + ".alpha"] = float(scale * weights.rank)
    return out
