"""Checkpoint files: safe reading (io: safetensors headers, mmap, folders, fingerprints) and stored
weight formats (dequant: fp8 with scales, ComfyUI mixed quantization)."""

from __future__ import annotations

from .dequant import FP8_DTYPES, SCALE_SUFFIXES, dequantize, quant_layers, scale_key, stored_dtype
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

__all__ = [
    "FP8_DTYPES",
    "SCALE_SUFFIXES",
    "dequantize",
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
    "read_small_file",
]
