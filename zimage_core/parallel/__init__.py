"""Several devices for one transformer: Ulysses sequence parallelism (`ulysses`), data parallelism (`data`) and
the worker processes that hold the weights on each device (`workers`), all over torch.distributed (NCCL on
GPUs, gloo on the CPU)."""

from __future__ import annotations

from .data import batch_slice, data_parallel
from .ulysses import (
    ULYSSES_PLAN,
    SequenceParallelRunner,
    Shard,
    UlyssesAttention,
    padded_heads,
    sharded_length,
)

__all__ = [
    "ULYSSES_PLAN", "SequenceParallelRunner", "Shard", "UlyssesAttention", "batch_slice", "data_parallel",
    "padded_heads", "sharded_length",
]
