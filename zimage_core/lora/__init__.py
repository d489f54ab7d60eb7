"""LoRA files of every trainer's dialect mapped onto Z-Image (pure key and shape logic, no weights)."""

from __future__ import annotations

from .forms import ModuleWeights, group_modules, split_key
from .plan import LoraPlan, NotZImageLoraError, describe_foreign, plan_lora
from .report import STRENGTH_LIMIT, LoraReport, ModuleHit, lora_strength
from .targets import Target, text_encoder_targets, transformer_targets

__all__ = [
    "STRENGTH_LIMIT",
    "LoraPlan",
    "LoraReport",
    "ModuleHit",
    "ModuleWeights",
    "NotZImageLoraError",
    "Target",
    "describe_foreign",
    "group_modules",
    "lora_strength",
    "plan_lora",
    "split_key",
    "text_encoder_targets",
    "transformer_targets",
]
