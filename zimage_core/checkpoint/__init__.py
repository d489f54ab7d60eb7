"""Checkpoint files: safe reading (io: safetensors headers, mmap, folders, fingerprints), stored weight
formats (dequant: fp8 with scales, ComfyUI mixed quantization) and setting a model's parameters from them
(materialise)."""

from __future__ import annotations

from .dequant import (
    FP8_DTYPES,
    QUANT_SIDE_SUFFIXES,
    SCALE_SUFFIXES,
    dequantize,
    quant_configs,
    quant_layers,
    scale_key,
    stored_dtype,
)
from .io import (
    Checkpoint,
    TensorInfo,
    check_regular,
    model_fingerprint,
    open_checkpoint,
    open_regular,
    read_header,
    read_json,
    read_small_file,
)
from .materialise import LayerLoader, read_joined, set_param

__all__ = [
    "FP8_DTYPES",
    "LayerLoader",
    "QUANT_SIDE_SUFFIXES",
    "SCALE_SUFFIXES",
    "dequantize",
    "quant_configs",
    "quant_layers",
    "scale_key",
    "stored_dtype",
    "Checkpoint",
    "TensorInfo",
    "check_regular",
    "model_fingerprint",
    "open_checkpoint",
    "open_regular",
    "read_header",
    "read_json",
    "read_joined",
    "read_small_file",
    "set_param",
]
