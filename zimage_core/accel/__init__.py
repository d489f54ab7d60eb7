"""Opt-in speed and memory options: regional compile, fp8 weights, weight streaming and prefetching."""

from __future__ import annotations

from .compile import CompiledBlockCall, compile_blocks, is_compile_failure, uncompile_blocks
from .compile_cache import CompileCache
from .fp8 import FP8, FP8_MAX, Fp8Linear, fp8_matmul_supported, quantize_fp8
from .prefetch import WeightPrefetcher, prefetch_offloaded
from .streaming import BlockStreamer, HostPinner

__all__ = [
    "BlockStreamer",
    "CompileCache",
    "CompiledBlockCall",
    "FP8",
    "FP8_MAX",
    "Fp8Linear",
    "HostPinner",
    "compile_blocks",
    "fp8_matmul_supported",
    "is_compile_failure",
    "quantize_fp8",
    "prefetch_offloaded",
    "uncompile_blocks",
    "WeightPrefetcher",
]
