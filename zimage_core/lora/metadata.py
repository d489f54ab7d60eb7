"""alpha from a diffusers/PEFT LoRA file's metadata: `save_lora_weights` stores PEFT's LoraConfig (lora_alpha,
r, patterns, rsLoRA) as JSON under "lora_adapter_metadata" instead of `.alpha` tensors. diffusers scales by
it; without it such a file would be applied at the wrong strength whenever lora_alpha != r."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from ..checks import short_repr
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
    _check_config(cfg)
    out: dict[str, float] = {}
    for name, weights in modules.items():
        if weights.alpha is not None or not weights.form.startswith("LoRA") or not weights.rank:
            continue
        plain = name.split(".", 1)[1] if name.startswith(component + ".") else name
        r = _pattern_value(cfg.get("rank_pattern"), plain) or cfg.get("r") or weights.rank
        alpha = _pattern_value(cfg.get("alpha_pattern"), plain) or cfg["lora_alpha"]
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[name + ".alpha"] = float(scale * weights.rank)
    return out


def _check_config(cfg: Mapping) -> None:
    """The PEFT values used above are numbers PEFT itself would accept: ValueError naming the field if not."""

    def bad(field: str, value: object, expected: str) -> ValueError:
        return ValueError(f"its PEFT metadata ({METADATA_KEY}) has {field} = {short_repr(value)}, but PEFT needs "
                          f"{expected}. Re-save the LoRA (diffusers save_lora_weights), or remove that metadata.")

    def number(field: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
            raise bad(field, value, "a finite nonzero number")

    def rank(field: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20:
            raise bad(field, value, "a whole number >= 1")

    number("lora_alpha", cfg["lora_alpha"])
    if cfg.get("r") is not None:
        rank("r", cfg["r"])
    for field, check in (("rank_pattern", rank), ("alpha_pattern", number)):
        patterns = cfg.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, Mapping):
            raise bad(field, patterns, "a mapping of module names to values")
        for key, value in patterns.items():
            check(f"{field}[{short_repr(key, 40)}]", value)
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise bad("use_rslora", cfg["use_rslora"], "true or false")
