"""Attention of the transformer's blocks, through one dispatch.

`attention(q, k, v, mask)`: q, k, v (B, N, H, D) after q/k norm and RoPE, an optional boolean key mask
(B, 1, 1, N) (True = attend); returns (B, N, H * D). The default backend is PyTorch's SDPA (cuDNN or flash
on the GPU), unless `zimage_core.accel.attention_backends` picks another (its measured table by GPU, or
ZIMAGE_ATTENTION in the environment; one log line says which runs). Another backend can be installed for the calls made inside `with use_backend(fn):` (ComfyUI's
nodes install ComfyUI's `optimized_attention_masked`, so its `optimized_attention_override` and
`--use-*-attention` choices reach this model); fp8 attention (`zimage_core.accel.fp8_attention`) is the
backend of blocks whose `fp8_attention` flag is on, unless a backend is installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

AttentionBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""`(q, k, v, mask) -> out`: q, k, v (B, N, H, D), mask (B, 1, 1, N) bool or None; out (B, N, H * D)."""

_installed: AttentionBackend | None = None
_default: AttentionBackend | None = None


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention (mask None for even batches, so it may pick cuDNN/flash)."""
    b, n = q.shape[:2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, -1)


def fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """float8_e4m3fn q/k/v attention (zimage_core.accel.fp8_attention)."""
    from ..accel.fp8_attention import fp8_attention
    b, n = q.shape[:2]
    return fp8_attention(q, k, v, mask).reshape(b, n, -1)


def default() -> AttentionBackend:
    """The process default backend (looked up once: accel.attention_backends.pick_default)."""
    global _default
    if _default is None:
        from ..accel.attention_backends import pick_default
        _default = pick_default()
    return _default


def installed() -> AttentionBackend | None:
    """The backend installed by the innermost `use_backend`, or None."""
    return _installed


@contextlib.contextmanager
def use_backend(backend: AttentionBackend | None) -> Iterator[None]:
    """Route the attention of every block called inside the block through `backend` (None: the defaults)."""
    global _installed
    previous, _installed = _installed, backend
    try:
        yield
    finally:
        _installed = previous


def backend_for(fp8_attention: bool = False) -> AttentionBackend:
    """The backend a block's attention runs on now: the installed one, else fp8 or the process default by the
    block's flag (a sequence-parallel exchange wraps this one: zimage_core.parallel)."""
    return _installed or (fp8 if fp8_attention else _default or default())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              fp8_attention: bool = False) -> torch.Tensor:
    return backend_for(fp8_attention)(q, k, v, mask)
