"""GGUF files for tests, written with the `gguf` package's own writer and quantisers, and their reference
dequantisation (the package's numpy `gguf.quants.dequantize`), independent of the product's reader.

Types the package cannot quantise (the K-quants) are random valid blocks: random bytes whose fp16 scale
fields are small finite numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

# Byte offsets of the fp16 scale fields in one block of each type (the format's block layouts).
SCALE_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
                "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
QUANTIZABLE = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}
ALL_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def qtype(name: str):
    return gguf.GGMLQuantizationType[name]


def random_blocks(name: str, shape: tuple[int, ...], rng: np.random.Generator, scale: float = 0.002) -> np.ndarray:
    """Random valid `name` blocks for a tensor of `shape` (uint8, shape (*shape[:-1], bytes per row))."""
    elems, size = gguf.GGML_QUANT_SIZES[qtype(name)]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    n = rows * shape[-1] // elems
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for at in SCALE_FIELDS[name]:
        raw[:, at:at + 2] = (rng.standard_normal(n) * scale).astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw.reshape(*shape[:-1], -1) if len(shape) > 1 else raw.reshape(-1)


def encode(value: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """`value` (float32) stored as `name`: quantised by the package where it can, else random valid blocks of
    the same shape (K-quants)."""
    if name in QUANTIZABLE:
        return gguf.quants.quantize(np.ascontiguousarray(value, dtype=np.float32), qtype(name))
    return random_blocks(name, value.shape, rng)


def reference(stored: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The package's numpy dequantisation, float32 in `shape`."""
    return np.asarray(gguf.quants.dequantize(stored, qtype(name)), dtype=np.float32).reshape(shape)


def write_gguf(path: Path, tensors: dict[str, np.ndarray], types: dict[str, str], arch: str | None = "lumina2",
               fields: dict | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Write `tensors` (float32 arrays) as a GGUF file with each tensor in `types[name]` (default F32); returns
    the reference float32 values of what was written (the package's dequantisation of the stored bytes)."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch or "unused")
    if arch is None:  # files of tools that write no architecture
        writer.kv_data[0].pop("general.architecture", None)
    for key, value in (fields or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_uint32(key, value)
    out = {}
    for key, value in tensors.items():
        name = types.get(key, "F32")
        value = np.ascontiguousarray(value, dtype=np.float32)
        stored = encode(value, name, rng)
        if name == "F32":
            writer.add_tensor(key, stored)
        else:
            writer.add_tensor(key, stored, raw_shape=stored.shape, raw_dtype=qtype(name))
        out[key] = reference(stored, name, value.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def q4_k_m_like(key: str, shape: tuple[int, ...]) -> str:
    """A Q4_K_M-like mix as llama.cpp's quantiser makes it: 1-D tensors F32; attention value/output and the FFN
    down projections Q6_K, Q5_K for the first layer's matrices, Q4_K elsewhere; rows that are not whole 256-value
    super-blocks fall back to Q8_0 (or F16 when not whole 32-value blocks)."""
    if len(shape) < 2:
        return "F32"
    if shape[-1] % 256:
        return "Q8_0" if shape[-1] % 32 == 0 else "F16"
    if any(s in key for s in ("attention.out", "feed_forward.w2", "attn_v", "ffn_down")):
        return "Q6_K"
    if ".0." in key:
        return "Q5_K"
    return "Q4_K"


def q8_0_mix(key: str, shape: tuple[int, ...]) -> str:
    """Q8_0 for matrices of whole 32-value blocks, F32 for the rest (ComfyUI-GGUF's Q8_0 files)."""
    return "Q8_0" if len(shape) >= 2 and shape[-1] % 32 == 0 else "F32"
