"""The one owner of ComfyUI-version differences the pack depends on (0.3.75, 0.18.1, 0.28).

Every branch on what a ComfyUI install has lives here, named after what it decides, so a new ComfyUI
release means reading one file.
"""

from __future__ import annotations

from typing import Any

import comfy.model_management as mm
import comfy.model_patcher

# ComfyUI's patcher class: 0.18.1 and later name the one their loaders use CoreModelPatcher (and swap in the
# dynamic-VRAM patcher at start-up); 0.3.75 has only ModelPatcher.
CorePatcher = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def core_patcher_class() -> type:
    """The patcher class ComfyUI's own loaders use now (read when a model is built: 0.18.1+ replaces it at
    start-up when dynamic VRAM is on)."""
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def archive_model_dtypes(model: Any) -> None:
    """0.18.1+: record each weight's dtype for dynamic loading (a no-op on 0.3.75)."""
    if hasattr(mm, "archive_model_dtypes"):
        mm.archive_model_dtypes(model)


def is_dynamic_layer(module: Any) -> bool:
    """A layer that dynamic VRAM (comfy-aimdo, 0.18.1+) manages: it copies its own weights when it runs."""
    return hasattr(module, "_v")


def is_dynamic_load_list(loading: list) -> bool:
    """0.18.1+'s dynamic-VRAM `_load_list` entries start with a bool and are ordered otherwise."""
    return bool(loading) and isinstance(loading[0][0], bool)


def loaded_models() -> list:
    """The models ComfyUI holds on the GPU for the current prompt (an empty list where it cannot tell)."""
    return mm.loaded_models(only_currently_used=True) if hasattr(mm, "loaded_models") else []
