"""GGUF transformers inside ComfyUI: layers that keep a GGUF file's block-quantised weights (Q8_0, Q4_K, ...) as
their bytes and dequantise them per call, built on the operations ComfyUI picked (so its partial loading moves
and offloads them like any layer, and our prefetch copies their bytes), and the patcher part that applies
LoRA patches to the dequantised weight at run time (a quantised weight cannot be patched in place), as
ComfyUI-GGUF does.
"""

from __future__ import annotations

from typing import Any

import comfy.model_management as mm
import comfy.model_patcher
import torch

from ..zimage_core.checkpoint.dequant import GGUF_FORMAT
from ..zimage_core.checkpoint.gguf_quants import dequantize

GGUF_SUFFIX = ".gguf"
# ComfyUI-GGUF's folder names for .gguf files (registered by that pack, when installed).
GGUF_FOLDERS = {"diffusion_models": "unet_gguf", "text_encoders": "clip_gguf"}


class GGUFLinear:
    """Mixin over an operations' Linear: with `gguf_type` set, `weight` is the file's bytes (uint8, one row of
    blocks per output row) and every call dequantises it on the input's device, applies the LoRA patches, and
    casts it to the input's dtype. Without it, the layer is its base class unchanged."""

    gguf_type: str | None = None
    gguf_shape: tuple[int, ...] = ()
    gguf_patches: list = []  # LowVramPatch-style callables for a layer loaded whole (see GGUFPatching)

    def gguf_weight(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        non_blocking = mm.device_supports_non_blocking(device)
        raw = self.weight.to(device, non_blocking=non_blocking)
        functions = list(self.weight_function)
        keys = {getattr(f, "key", None) for f in functions}
        functions += [f for f in self.gguf_patches if getattr(f, "key", None) not in keys]
        if not functions:  # dequantised straight into the compute dtype (float32 math, one rounding)
            return dequantize(raw, self.gguf_type, self.gguf_shape, dtype)
        weight = dequantize(raw, self.gguf_type, self.gguf_shape, torch.float32)
        for f in functions:  # LoRA etc. on the float32 weight, before rounding to the compute dtype
            weight = f(weight)
        return weight.to(dtype)

    def forward(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.gguf_type is None:
            return super().forward(input, *args, **kwargs)
        weight = self.gguf_weight(input.device, input.dtype)
        bias = None
        if self.bias is not None:
            bias = self.bias.to(device=input.device, dtype=input.dtype,
                                non_blocking=mm.device_supports_non_blocking(input.device))
            for f in self.bias_function:
                bias = f(bias)
        return torch.nn.functional.linear(input, weight, bias)

    def forward_comfy_cast_weights(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.gguf_type is None:
            return super().forward_comfy_cast_weights(input, *args, **kwargs)
        return self.forward(input, *args, **kwargs)


class GGUFEmbedding:
    """Mixin over an operations' Embedding (a text encoder's token table): with `gguf_type` set, only the rows
    of the tokens looked up are dequantised (each row is whole blocks), in float32."""

    gguf_type: str | None = None
    gguf_shape: tuple[int, ...] = ()

    def forward(self, input: torch.Tensor, *args: Any, out_dtype: torch.dtype | None = None, **kwargs: Any):
        if self.gguf_type is None:
            return super().forward(input, *args, out_dtype=out_dtype, **kwargs) if out_dtype is not None \
                else super().forward(input, *args, **kwargs)
        rows = self.weight[input.reshape(-1).to(self.weight.device)].to(input.device)
        out = dequantize(rows, self.gguf_type, (rows.shape[0], self.gguf_shape[-1]), torch.float32)
        out = out.reshape(*input.shape, self.gguf_shape[-1])
        return out if out_dtype is None else out.to(out_dtype)

    def forward_comfy_cast_weights(self, input: torch.Tensor, *args: Any, **kwargs: Any):
        if self.gguf_type is None:
            return super().forward_comfy_cast_weights(input, *args, **kwargs)
        return self.forward(input, *args, **kwargs)


_OPS: dict[Any, Any] = {}


def gguf_operations(base: Any) -> Any:
    """`base` operations (e.g. what comfy.ops.pick_operations returned) whose Linear and Embedding can hold
    GGUF block-quantised weights."""
    if base not in _OPS:
        layers = {"Linear": type("GGUFLinear", (GGUFLinear, base.Linear), {})}
        if hasattr(base, "Embedding"):
            layers["Embedding"] = type("GGUFEmbedding", (GGUFEmbedding, base.Embedding), {})
        _OPS[base] = type(f"GGUF{getattr(base, '__name__', 'Ops')}", (base,), layers)
    return _OPS[base]


class GGUFLayerLoader:
    """zimage_core's LayerLoader for `gguf_operations` Linears: a GGUF block-quantised weight is kept as its
    bytes; float weights and biases are stored in `dtype`, as the rest of the model."""

    formats = frozenset({GGUF_FORMAT})

    def __init__(self, operations: Any, dtype: torch.dtype) -> None:
        self.layers = tuple(getattr(operations, n) for n in ("Linear", "Embedding") if hasattr(operations, n))
        self.dtype = dtype

    def handles(self, module: torch.nn.Module) -> bool:
        return isinstance(module, self.layers)

    def load(self, module: torch.nn.Module, name: str, tensors: dict[str, torch.Tensor], quant: dict | None,
             device: torch.device | str) -> None:
        weight = tensors["weight"]
        if quant is not None and quant.get("format") == GGUF_FORMAT:
            shape = tuple(module.weight.shape)  # the layer's (built on the meta device)
            rows = weight.shape[0] if weight.dim() == 2 else -1
            if weight.dtype != torch.uint8 or rows != shape[0]:
                raise ValueError(f"GGUF {quant.get('type')} bytes of shape {tuple(weight.shape)} for a weight of "
                                 f"shape {shape}")
            module.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
            module.gguf_type, module.gguf_shape = quant["type"], shape
        else:
            module.weight = torch.nn.Parameter(weight.to(self.dtype), requires_grad=False)
        if "bias" in tensors:
            module.bias = torch.nn.Parameter(tensors["bias"].to(self.dtype), requires_grad=False)


def _owner(model: torch.nn.Module, key: str) -> tuple[torch.nn.Module | None, str]:
    owner, _, param = key.rpartition(".")
    try:
        return model.get_submodule(owner), param
    except AttributeError:
        return None, param


class GGUFPatching:
    """Patcher mixin: a weight patch (LoRA) on a GGUF-quantised layer loaded whole is applied at run time to the
    dequantised weight (`GGUFLinear.gguf_patches`) instead of to the stored bytes; partly loaded layers get
    ComfyUI's own run-time patches (weight_function), which GGUFLinear applies the same way."""

    def patch_weight_to_device(self, key, device_to=None, *args, **kwargs):
        module, param = _owner(self.model, key)
        if param != "weight" or getattr(module, "gguf_type", None) is None:
            return super().patch_weight_to_device(key, device_to, *args, **kwargs)
        patches = [comfy.model_patcher.LowVramPatch(key, self.patches)] if key in self.patches else []
        module.gguf_patches = patches
        if kwargs.get("return_weight"):
            return module.gguf_weight(device_to or module.weight.device, torch.float32)
        return None

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for module in self.model.modules():
                if module.__dict__.get("gguf_patches"):
                    module.gguf_patches = []
        return super().unpatch_model(device_to, unpatch_weights)


_PATCHERS: dict[type, type] = {}


def gguf_patcher_class(base: type) -> type:
    """`base` (a ModelPatcher class) with GGUFPatching, e.g. for a CLIP's patcher (clones keep the class)."""
    if base not in _PATCHERS:
        _PATCHERS[base] = base if issubclass(base, GGUFPatching) else type(f"GGUF{base.__name__}", (GGUFPatching, base), {})
    return _PATCHERS[base]
