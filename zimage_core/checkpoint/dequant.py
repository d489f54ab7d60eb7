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
# Side tensors of a ComfyUI mixed-precision ("comfy_quant") layer that its own layer class reads with the weight.
QUANT_SIDE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")
# The quantisation "format" of a GGUF file's block-quantised weights (Q8_0, Q4_K, ...: `Checkpoint.block_quant`),
# as layer loaders name the formats they keep quantised.
GGUF_FORMAT = "gguf"


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


def _comfy_quant_config(ckpt: Checkpoint, layer: str) -> dict | None:
    # Newer ComfyUI stores per-layer quantization info as a uint8 JSON tensor "<layer>.comfy_quant".
    key = f"{layer}.comfy_quant"
    if key not in ckpt.infos:
        return None
    if ckpt.dtype(key) != torch.uint8 or len(ckpt.shape(key)) != 1 or ckpt.shape(key)[0] > 1 << 16:
        return None  # a small JSON text, or not ComfyUI's marker
    try:
        conf = json.loads(bytes(ckpt[key].tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return conf if isinstance(conf, dict) and isinstance(conf.get("format"), str) else None


def _comfy_quant_format(ckpt: Checkpoint, layer: str) -> str | None:
    conf = _comfy_quant_config(ckpt, layer)
    return None if conf is None else conf["format"]


def quant_configs(ckpt: Checkpoint, prefix: str = "") -> dict[str, dict]:
    """ComfyUI mixed-precision ("comfy_quant") layers of a file: layer name without `prefix` -> its config
    (`{"format": "float8_e4m3fn", ...}`), from the `_quantization_metadata` header entry (names with or
    without the prefix, as ComfyUI matches them) and the per-layer `<layer>.comfy_quant` tensors. Empty for
    any other file (plain, fp8 or scaled_fp8)."""
    out: dict[str, dict] = {}
    raw = ckpt.metadata.get("_quantization_metadata")
    if raw:
        try:
            layers = json.loads(raw).get("layers", {})
        except (json.JSONDecodeError, AttributeError, RecursionError):
            layers = {}
        for name, conf in (layers.items() if isinstance(layers, dict) else ()):
            conf = conf if isinstance(conf, dict) else {"format": conf}
            if isinstance(name, str) and isinstance(conf.get("format"), str):
                out[name[len(prefix):] if prefix and name.startswith(prefix) else name] = conf
    for key, qtype in ckpt.block_quant.items():  # GGUF: each block-quantised weight's layer
        if key.startswith(prefix) and (layer := _layer(key)) is not None:
            out[layer[len(prefix):]] = {"format": GGUF_FORMAT, "type": qtype}
    for key in ckpt.infos:
        if key.startswith(prefix) and key.endswith(".comfy_quant"):
            layer = key[: -len(".comfy_quant")]
            conf = _comfy_quant_config(ckpt, layer)
            if conf is not None:
                out[layer[len(prefix):]] = conf
    return out


def _layer(key: str) -> str | None:
    return key[: -len(".weight")] if key.endswith(".weight") else None


def scale_key(ckpt: Checkpoint, key: str) -> str | None:
    """The stored scale of an fp8 weight, if the file has one."""
    layer = _layer(key)
    if layer is None:
        return None
    return next((f"{layer}.{s}" for s in SCALE_SUFFIXES if f"{layer}.{s}" in ckpt.infos), None)


def stored_dtype(ckpt: Checkpoint, key: str, layers: dict[str, str], what: str, fix: str,
                 keep_formats: frozenset[str] = frozenset()) -> torch.dtype:
    """The dtype a tensor's bytes hold: its header dtype, or fp8 for a uint8/int8 container that the
    quantization metadata describes. Anything else that is not floating point is refused, as is a
    non-float scale, except weights of a quantization format in `keep_formats` (layers that load their
    own quantized weights, e.g. ComfyUI's INT8/NVFP4 ones), which keep their container dtype."""
    if key in ckpt.block_quant:  # GGUF: kept as its bytes by layers that read it, else dequantised to float32
        return ckpt.dtype(key) if GGUF_FORMAT in keep_formats else torch.float32
    dtype = ckpt.dtype(key)
    layer = _layer(key)
    if dtype in (torch.uint8, torch.int8) and layer is not None:
        # Header names may leave out the file's key prefix (e.g. model.diffusion_model.), as ComfyUI allows.
        fmt = (layers.get(layer) or next((f for n, f in layers.items() if layer.endswith("." + n)), None)
               or _comfy_quant_format(ckpt, layer))
        if fmt in keep_formats and fmt not in FP8_FORMATS:
            return dtype
        if fmt not in FP8_FORMATS:
            raise CheckpointError(ckpt.path, f"{what} in bf16/fp16/fp32 or fp8",
                                  f"tensor {key} stored as {dtype} with quantization format {str(fmt)[:40]!r}",
                                  "This quantization format is not supported; use the bf16 or fp8 file.")
        dtype = FP8_FORMATS[fmt]
    else:
        require_float(ckpt.path, key, dtype, what, fix)
    if dtype in FP8_DTYPES and (scale := scale_key(ckpt, key)) is not None:
        # Block-scaled fp8 (MXFP8: e8m0 scales in uint8) is read by the layers that keep its format.
        if not (keep_formats and layer is not None and _comfy_quant_format(ckpt, layer) in keep_formats - {*FP8_FORMATS}):
            require_float(ckpt.path, scale, ckpt.dtype(scale), what, fix)
    return dtype


def dequantize(ckpt: Checkpoint, key: str, stored: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Read one tensor whose `stored_dtype` the caller checked; fp8 weights become float32 times their
    scale. A non-fp8 result may still be the file's memory: the caller passes it through `Checkpoint.owned`.
    """
    if (tensor := ckpt.dequantized(key, device)) is not None:  # GGUF block quantisation
        return tensor
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
