"""Fused elementwise steps of the transformer block: Triton kernels on CUDA, plain torch elsewhere.

Each function here has two paths with the same math:
- the reference path: the unfused torch ops the block always used (CPU, no Triton, autograd, and
  inside torch.compile, where Inductor fuses these ops itself);
- the fused path (`triton_kernels.py`): one kernel per step, fp32 inside and one rounding at the
  end, so it equals the reference within bf16 rounding (tests/test_kernels.py checks both).

`fused_ok(x)` decides; `ZIMAGE_FUSED_KERNELS=0` in the environment turns the fused path off everywhere,
`ZImageTransformer.fused_kernels = False` for one model.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
ENABLED = os.environ.get("ZIMAGE_FUSED_KERNELS", "1").lower() not in ("0", "false", "off", "no")
_triton: ModuleType | None | bool = False  # False: not looked up yet; None: unavailable


def triton_kernels() -> ModuleType | None:
    """The Triton kernel module, or None when Triton cannot be imported (looked up once)."""
    global _triton
    if _triton is False:
        try:
            _triton = importlib.import_module(".triton_kernels", __package__)
        except Exception as exc:  # noqa: BLE001 - no Triton (CPU wheels, macOS, ...) means: reference path
            log.debug("Triton kernels unavailable (%s); using the torch path.", exc)
            _triton = None
    return _triton  # type: ignore[return-value]


def triton_failure(exc: BaseException) -> bool:
    """An error raised by Triton itself (compiling or launching a kernel), not by the model."""
    return (type(exc).__module__ or "").startswith("triton")


def disable(exc: BaseException) -> None:
    """Turn the fused path off for this process after a Triton failure (the torch path takes over)."""
    global ENABLED
    ENABLED = False
    log.warning("Z-Image fused kernels failed (%s: %s); using the plain torch path from now on.",
                type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")


def _interpreting() -> bool:
    mod = triton_kernels()
    return bool(mod is not None and mod.INTERPRET)


def fused_ok(x: torch.Tensor) -> bool:
    """Whether the fused kernels may run on x: CUDA (or Triton's CPU interpreter, for tests), Triton
    present, not being traced by torch.compile, and no autograd graph to build."""
    if not ENABLED or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if not (x.is_cuda or (x.device.type == "cpu" and _interpreting())):
        return False
    return triton_kernels() is not None


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    # Z-Image's attention/FFN branches overflow fp16; clamping (as ComfyUI does) keeps images finite.
    if x.dtype == torch.float16:
        return torch.nan_to_num(x, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)
    return x


def _w(norm: Any, x: torch.Tensor) -> torch.Tensor:
    # .to() is a no-op normally; it matters when ComfyUI offloads weights (lowvram) or stores fp8.
    return norm.weight.to(device=x.device, dtype=x.dtype)


def _no_grad_params(*ts: torch.Tensor | None) -> bool:
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in ts)


def _rows_ok(x: torch.Tensor, *per_batch: torch.Tensor | None) -> bool:
    """(B, N, D) activations with (B, 1, D) modulation vectors: the layouts the kernels index."""
    if x.ndim != 3:
        return False
    b, _, d = x.shape
    return all(t is None or (t.shape == (b, 1, d) and t.dtype == x.dtype and t.device == x.device)
               for t in per_batch)


# ---------------------------------------------------------------------------------------------
# the block's steps
# ---------------------------------------------------------------------------------------------

def _fp8_act(out: Any, like: torch.Tensor) -> Any:
    from .fp8 import Fp8Act
    data, scale = out
    return Fp8Act(data, scale, tuple(like.shape), like.dtype)


def norm_modulate(x: torch.Tensor, norm: Any, scale: torch.Tensor | None, fused: bool,
                  quant: bool = False) -> Any:
    """`norm(x) * (1 + scale)` (just `norm(x)` without scale); norm is an RMSNorm (weight, eps). With `quant`
    (fused path only) the result comes quantised for an fp8 matmul (`accel.fp8.Fp8Act`)."""
    if fused and ENABLED and _rows_ok(x, scale) and _no_grad_params(norm.weight, scale):
        try:
            if quant:
                return _fp8_act(triton_kernels().rms_norm_modulate(x, _w(norm, x), scale, norm.eps, True), x)
            return triton_kernels().rms_norm_modulate(x, _w(norm, x), scale, norm.eps)
        except Exception as exc:
            if not triton_failure(exc):
                raise
            disable(exc)
    y = norm(x)
    return y if scale is None else y * (1 + scale)


def gated_residual(x: torch.Tensor, y: torch.Tensor, norm: Any, gate: torch.Tensor | None, fused: bool,
                   next_norm: Any = None, next_scale: torch.Tensor | None = None, quant: bool = False
                   ) -> tuple[torch.Tensor, Any]:
    """`x + tanh(gate) * norm(clamp_fp16(y))` (`x + norm(..)` without gate) and, when `next_norm` is
    given, also the next sub-block's input `norm_modulate(new x, next_norm, next_scale)` (quantised for an
    fp8 matmul with `quant`, on the fused path)."""
    if (fused and ENABLED and y.shape == x.shape and y.dtype == x.dtype and _rows_ok(x, gate, next_scale)
            and (next_norm is not None or next_scale is None)
            and _no_grad_params(y, norm.weight, gate, next_scale)
            and (next_norm is None or next_norm.eps == norm.eps)):
        try:
            out, nxt = triton_kernels().gated_residual(x, y, _w(norm, x), gate, norm.eps,
                                                       _w(next_norm, x) if next_norm is not None else None,
                                                       next_scale, quant and next_norm is not None)
            return out, (_fp8_act(nxt, x) if isinstance(nxt, tuple) else nxt)
        except Exception as exc:
            if not triton_failure(exc):
                raise
            disable(exc)
    h = norm(clamp_fp16(y))
    x = x + h if gate is None else torch.addcmul(x, gate.tanh(), h)
    if next_norm is None:
        return x, None
    return x, norm_modulate(x, next_norm, next_scale, False)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the head dim. x: (B, L, H, D); rope: (B|1, L, 1, D/2, 2, 2).

    rope[..., :, j] is column j of each 2x2 rotation matrix, so out = R @ (x0, x1): two fused
    elementwise kernels. It runs in the compute dtype (the references upcast to fp32; on bf16 that
    changes outputs by ~0.07% relative, ten times less than bf16 itself, and saves two fp32 copies).
    """
    xp = x.unflatten(-1, (-1, 1, 2))  # (..., D/2, 1, 2)
    out = rope[..., 0] * xp[..., 0]
    out.addcmul_(rope[..., 1], xp[..., 1])
    return out.flatten(-2)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def qk_norm_rope(qkv: torch.Tensor, q_norm: Any, k_norm: Any, rope: torch.Tensor, fused: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, N, 3, H, D) from the fused projection -> q, k normed per head and rotated, and v; each
    (B, N, H, D). The fused path rewrites q and k in qkv's own memory (it is the projection's fresh
    output) and returns views."""
    b, n, _, h, d = qkv.shape
    if (fused and ENABLED and qkv.is_contiguous() and _pow2(d) and q_norm.eps == k_norm.eps
            and rope.ndim == 6 and rope.shape[1] == n and rope.shape[0] in (1, b) and rope.shape[2] == 1
            and rope.shape[3:] == (d // 2, 2, 2) and rope.device == qkv.device
            and _no_grad_params(qkv, q_norm.weight, k_norm.weight)):
        try:
            triton_kernels().qk_norm_rope_(qkv, _w(q_norm, qkv), _w(k_norm, qkv),
                                           rope.to(qkv.dtype).reshape(rope.shape[0], n, d // 2, 2, 2), q_norm.eps)
            return qkv.unbind(2)
        except Exception as exc:  # Triton fails before it writes anything: qkv is intact
            if not triton_failure(exc):
                raise
            disable(exc)
    q, k, v = qkv.unbind(2)
    return apply_rope(q_norm(q), rope), apply_rope(k_norm(k), rope), v


def silu_mul(a: torch.Tensor, b: torch.Tensor, fused: bool, quant: bool = False) -> Any:
    """`clamp_fp16(silu(a) * b)`: the SwiGLU product (quantised for an fp8 matmul with `quant`, fused path)."""
    if fused and ENABLED and a.shape == b.shape and a.dtype == b.dtype and _no_grad_params(a, b):
        try:
            if quant:
                return _fp8_act(triton_kernels().silu_mul_quant(a, b), a)
            return triton_kernels().silu_mul(a, b)
        except Exception as exc:
            if not triton_failure(exc):
                raise
            disable(exc)
    return clamp_fp16(F.silu(a) * b)
