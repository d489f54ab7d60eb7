"""Stored weight formats -> plain floating-point tensors, for every component's loader.

A tensor's bytes may be bf16/fp16/fp32, or fp8 (e4m3fn/e5m2) with an optional per-tensor or per-row
scale (`<layer>.weight_scale` from ComfyUI's mixed files, `<layer>.scale_weight` from scaled_fp8
files). ComfyUI's "mixed" files may also store fp8 bytes in a uint8/int8 container described by the
`_quantization_metadata` header entry or a `<layer>.comfy_quant` JSON tensor.
"""

from __future__ import annotations

import json

import torch

from ..checks import require_float
from ..errors import CheckpointError
from .io import Checkpoint

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
SCALE_SUFFIXES = ("weight_scale", "scale_weight")


def quant_layers(ckpt: Checkpoint) -> dict[str, str]:
    """ComfyUI "mixed" quantization metadata: layer name -> format, if the file has it."""
    raw = ckpt.metadata.get("_quantization_metadata")
    if not raw:
        return {}
    try:
        layers = json.loads(raw).get("layers", {})
        return {k: (v.get("format") if isinstance(v, dict) else v) for k, v in layers.items()}
    except (json.JSONDecodeError, AttributeError, RecursionError):
        return {}


def _comfy_quant_format(ckpt: Checkpoint, layer: str) -> str | None:
    # Newer ComfyUI stores per-layer quantization info as a uint8 JSON tensor "<layer>.comfy_quant".
    key = f"{layer}.comfy_quant"
    if key not in ckpt.infos:
        return None
    if ckpt.dtype(key) != torch.uint8 or len(ckpt.shape(key)) != 1 or ckpt.shape(key)[0] > 1 << 16:
        return None  # a small JSON text, or not ComfyUI's marker
    try:
        return json.loads(bytes(ckpt[key].tolist()).decode("utf-8")).get("format")
    except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):
        return None


def _layer(key: str) -> str | None:
    return key[: -len(".weight")] if key.endswith(".weight") else None


def scale_key(ckpt: Checkpoint, key: str) -> str | None:
    """The stored scale of an fp8 weight, if the file has one."""
    layer = _layer(key)
    if layer is None:
        return None
    return next((f"{layer}.{s}" for s in SCALE_SUFFIXES if f"{layer}.{s}" in ckpt.infos), None)


def stored_dtype(ckpt: Checkpoint, key: str, layers: dict[str, str], what: str, fix: str) -> torch.dtype:
    """The dtype a tensor's bytes hold: its header dtype, or fp8 for a uint8/int8 container that the
    quantization metadata describes. Anything else that is not floating point is refused, as is a
    non-float scale."""
    dtype = ckpt.dtype(key)
    layer = _layer(key)
    if dtype in (torch.uint8, torch.int8) and layer is not None:
        fmt = layers.get(layer) or _comfy_quant_format(ckpt, layer)
        if fmt not in FP8_FORMATS:
            raise CheckpointError(ckpt.path, f"{what} in bf16/fp16/fp32 or fp8",
                                  f"tensor {key} stored as {dtype} with quantization format {str(fmt)[:40]!r}",
                                  "This quantization format is not supported; use the bf16 or fp8 file.")
        dtype = FP8_FORMATS[fmt]
    else:
        require_float(ckpt.path, key, dtype, what, fix)
    if dtype in FP8_DTYPES and (scale := scale_key(ckpt, key)) is not None:
        require_float(ckpt.path, scale, ckpt.dtype(scale), what, fix)
    return dtype


def dequantize(ckpt: Checkpoint, key: str, stored: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Read one tensor whose `stored_dtype` the caller checked; fp8 weights become float32 times their
    scale. A non-fp8 result may still be the file's memory: the caller passes it through `Checkpoint.owned`.
    """
    tensor = ckpt.view(key)
    if tensor.dtype != stored:
        tensor = tensor.view(stored)  # fp8 bytes in a uint8/int8 container
    if tensor.dtype not in FP8_DTYPES:
        return tensor
    tensor = tensor.to(device).to(torch.float32)
    scale_name = scale_key(ckpt, key)
    if scale_name is None:
        return tensor
    scale = ckpt.view(scale_name).to(device=device, dtype=torch.float32)
    if scale.numel() == 1:
        return tensor * scale.reshape(())
    if scale.numel() == tensor.shape[0]:
        return tensor * scale.reshape(-1, *([1] * (tensor.dim() - 1)))
    raise CheckpointError(ckpt.path, f"a per-tensor or per-row fp8 scale for {key}",
                          f"{scale_name} of shape {tuple(scale.shape)}",
                          "This quantization layout is not supported; use the bf16 file.")
