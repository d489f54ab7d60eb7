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
# The patcher for our modules that are not built from ComfyUI's operations (the Qwen3 text encoder, the FLUX
# VAE): dynamic VRAM (0.18.2+, on by default on NVIDIA) streams weights only through comfy.ops layers, and with
# it these encoded and decoded many times slower (bench/RESULTS.md, 0.28 dynamic-VRAM run). They load the
# classic way, as ComfyUI's own VAEs that opt out of dynamic loading (`disable_offload`) do.
ClassicPatcher = comfy.model_patcher.ModelPatcher


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


def set_quant_config(model_config: Any, layers: dict[str, dict]) -> None:
    """Mark `model_config` as ComfyUI's model detection does for a file with these comfy_quant layers (layer
    name -> {"format": ...}), so pick_operations returns its mixed-precision layers: 0.18.1+ sets
    `quant_config` (its layers then read each layer's `comfy_quant` tensor); 0.3.75 has `layer_quant_config`
    (layer name -> config, which it reads only from a file's `_quantization_metadata` header)."""
    import comfy.utils

    if layers_read_comfy_quant():
        model_config.quant_config = comfy.utils.detect_layer_quantization(
            {f"{name}.comfy_quant": None for name in layers}, "")
    else:
        model_config.layer_quant_config = dict(layers)


def layers_read_comfy_quant() -> bool:
    """Whether the mixed-precision layers of this ComfyUI learn a layer's quantization from a `comfy_quant`
    tensor beside its weight (0.18.1+) rather than from the config's `layer_quant_config` (0.3.75)."""
    import comfy.utils

    return hasattr(comfy.utils, "detect_layer_quantization")


def is_mixed_precision_ops(operations: Any) -> bool:
    """ComfyUI's mixed-precision operations (comfy.ops.mixed_precision_ops, all three versions): their
    Linear creates its weight when it loads, from the tensors it is given."""
    return getattr(operations, "__name__", "") == "MixedPrecisionOps"


def quant_formats() -> frozenset[str]:
    """The comfy_quant formats this ComfyUI's layers know (`comfy.quant_ops.QUANT_ALGOS`)."""
    import comfy.quant_ops

    return frozenset(getattr(comfy.quant_ops, "QUANT_ALGOS", {}))
