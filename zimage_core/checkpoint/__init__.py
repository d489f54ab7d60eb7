"""Reading checkpoint files safely (safetensors headers, mmap, folders, fingerprints)."""

from __future__ import annotations

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
