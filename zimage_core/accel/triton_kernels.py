"""Triton kernels for the transformer block's elementwise work (eager path; see `kernels.py`).

Imported only when Triton is installed (`kernels.py` decides when to use them). Every kernel reads
bf16/fp16/fp32 and computes in fp32 with one rounding at the end, so it matches the unfused torch
ops (which round after each op) within bf16 rounding. With `TRITON_INTERPRET=1` (set before this
module is imported) the same kernels run on the CPU through Triton's interpreter: that is how the
CPU tests check them.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FP16_MAX = 65504.0
FP8_MAX = 448.0
FP8 = torch.float8_e4m3fn


@triton.jit
def _tanh(g):
    # tanh from exp (no libdevice call, so the interpreter runs it too); exact limits at +-inf.
    e = tl.exp(-2.0 * tl.abs(g))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(g < 0, -t, t)


@triton.jit
def _clamp16(y):
    # torch.nan_to_num(y, nan=0, posinf=FP16_MAX, neginf=-FP16_MAX)
    y = tl.where(y != y, 0.0, y)
    return tl.minimum(tl.maximum(y, -65504.0), 65504.0)


@triton.jit
def _store_row(Y, QS, row, cols, m, y, QUANT: tl.constexpr):
    """Store one row: as it is (Y's dtype), or with QUANT as e4m3 with its own scale max|y| / 448 (QS[row]),
    the per-token activation quantisation of the fp8 matmul that reads it."""
    if QUANT:
        s = tl.maximum(tl.max(tl.abs(y), axis=0) / 448.0, 1e-12)
        tl.store(Y + cols, (y / s).to(Y.dtype.element_ty), mask=m)
        tl.store(QS + row, s)
    else:
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _rms_norm_modulate_kernel(X, W, S, Y, QS, D, rows_per_batch, stride_sb, eps,
                              BLOCK_D: tl.constexpr, HAS_SCALE: tl.constexpr, QUANT: tl.constexpr):
    """Y[r] = rms_norm(X[r]) * W * (1 + S[batch(r)]); one program per row (QUANT: e4m3 + QS[r])."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    y = x * r * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_SCALE:
        b = row // rows_per_batch
        y = y * (1.0 + tl.load(S + b * stride_sb + cols, mask=m, other=0.0).to(tl.float32))
    _store_row(Y + row * D, QS, row, cols, m, y, QUANT)


@triton.jit
def _gated_residual_kernel(X, Yb, G, W, NW, NS, OUT, NOUT, NQS, D, rows_per_batch, stride_gb, stride_nsb, eps,
                           BLOCK_D: tl.constexpr, CLAMP: tl.constexpr, HAS_GATE: tl.constexpr,
                           HAS_NEXT: tl.constexpr, HAS_NEXT_SCALE: tl.constexpr, QUANT: tl.constexpr):
    """OUT = X + tanh(G) * rms_norm(clamp(Yb)) * W  (no gate: X + rms_norm(..) * W);
    with HAS_NEXT also NOUT = rms_norm(OUT) * NW (* (1 + NS)): the next sub-block's (modulated) input."""
    row = tl.program_id(0).to(tl.int64)
    b = row // rows_per_batch
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    y = tl.load(Yb + row * D + cols, mask=m, other=0.0).to(tl.float32)
    if CLAMP:
        y = _clamp16(y)
    r = 1.0 / tl.sqrt(tl.sum(y * y, axis=0) / D + eps)
    y = y * r * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_GATE:
        y = y * _tanh(tl.load(G + b * stride_gb + cols, mask=m, other=0.0).to(tl.float32))
    x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32) + y
    xo = x.to(OUT.dtype.element_ty)
    tl.store(OUT + row * D + cols, xo, mask=m)
    if HAS_NEXT:
        x = xo.to(tl.float32)  # the next norm reads the stored (rounded) residual, as the torch path does
        r2 = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        z = x * r2 * tl.load(NW + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_NEXT_SCALE:
            z = z * (1.0 + tl.load(NS + b * stride_nsb + cols, mask=m, other=0.0).to(tl.float32))
        _store_row(NOUT + row * D, NQS, row, cols, m, z, QUANT)


@triton.jit
def _qk_norm_rope_kernel(QKV, WQ, WK, ROPE, N, H, stride_tok, stride_part, stride_rb, stride_rn, eps,
                         HP: tl.constexpr, HD: tl.constexpr):
    """In place on the fused qkv projection (B*N, 3, H, HD): per-head RMSNorm of q (part 0) and k
    (part 1) with their weights, then the interleaved-pair rotation by the 2x2 tables
    ROPE (Bt, N, HD/2, 2, 2): out[2j+a] = R[j,a,0] * x[2j] + R[j,a,1] * x[2j+1]."""
    tok = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    b = tok // N
    n = tok % N
    heads = tl.arange(0, HP)
    dims = tl.arange(0, HD)
    hm = heads < H
    base = QKV + tok * stride_tok + part * stride_part
    ptrs = base + heads[:, None] * HD + dims[None, :]
    x = tl.load(ptrs, mask=hm[:, None], other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HD + eps)
    if part == 0:
        w = tl.load(WQ + dims).to(tl.float32)
    else:
        w = tl.load(WK + dims).to(tl.float32)
    x = x * r[:, None] * w[None, :]
    x0, x1 = tl.split(tl.reshape(x, (HP, HD // 2, 2)))
    pairs = tl.arange(0, HD // 2)
    rp = ROPE + b * stride_rb + n * stride_rn + pairs * 4
    r00 = tl.load(rp).to(tl.float32)[None, :]
    r01 = tl.load(rp + 1).to(tl.float32)[None, :]
    r10 = tl.load(rp + 2).to(tl.float32)[None, :]
    r11 = tl.load(rp + 3).to(tl.float32)[None, :]
    y = tl.reshape(tl.join(r00 * x0 + r01 * x1, r10 * x0 + r11 * x1), (HP, HD))
    tl.store(ptrs, y.to(QKV.dtype.element_ty), mask=hm[:, None])


@triton.jit
def _silu_mul_kernel(A, Bm, OUT, numel, BLOCK: tl.constexpr, CLAMP: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    a = tl.load(A + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(Bm + offs, mask=m, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * b
    if CLAMP:
        y = _clamp16(y)
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _silu_mul_quant_kernel(A, Bm, OUT, QS, D, BLOCK_D: tl.constexpr, CLAMP: tl.constexpr):
    """One row of silu(A) * B, stored in e4m3 with the row's scale (the w2 matmul's input)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    a = tl.load(A + row * D + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(Bm + row * D + cols, mask=m, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * b
    if CLAMP:
        y = _clamp16(y)
    _store_row(OUT + row * D, QS, row, cols, m, y, True)


# ---------------------------------------------------------------------------------------------
# launchers: shapes are checked by the caller (kernels.py); tensors are made contiguous here
# ---------------------------------------------------------------------------------------------

def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _per_batch(t: torch.Tensor | None, b: int, d: int, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, 1, D) modulation vector (often a strided chunk of the adaLN output) -> (B, D) view and its
    batch stride; `like` stands in when absent (the kernel does not read it then)."""
    if t is None:
        return like, 0
    t = t.reshape(b, d)
    if t.stride(1) != 1:
        t = t.contiguous()
    return t, t.stride(0)


def _quant_out(like: torch.Tensor, quant: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The output buffer (e4m3 when quantising) and the per-row scales (B*N, 1) float32 (a stand-in otherwise)."""
    rows = like.numel() // like.shape[-1]
    if quant:
        return torch.empty(like.shape, dtype=FP8, device=like.device), torch.empty(rows, 1, device=like.device)
    return torch.empty_like(like), like


def rms_norm_modulate(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, eps: float,
                      quant: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x (B, N, D); weight (D,); scale (B, 1, D) or None. With `quant`: (e4m3 (B, N, D), scales (B*N, 1))."""
    x = x.contiguous()
    b, n, d = x.shape
    y, qs = _quant_out(x, quant)
    block = triton.next_power_of_2(d)
    s, stride_s = _per_batch(scale, b, d, x)
    _rms_norm_modulate_kernel[(b * n,)](x, weight.contiguous(), s, y, qs, d, n, stride_s, eps, BLOCK_D=block,
                                        HAS_SCALE=scale is not None, QUANT=quant, num_warps=_warps(block))
    return (y, qs) if quant else y


def gated_residual(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, eps: float,
                   next_weight: torch.Tensor | None = None, next_scale: torch.Tensor | None = None,
                   quant: bool = False) -> tuple[torch.Tensor, Any]:
    """x, y (B, N, D); gate / next_scale (B, 1, D) or None. Returns (x_out, next_input or None); with `quant`
    the next input is (e4m3 (B, N, D), scales (B*N, 1))."""
    x, y = x.contiguous(), y.contiguous()
    b, n, d = x.shape
    out = torch.empty_like(x)
    has_next = next_weight is not None
    quant = quant and has_next
    nout, nqs = _quant_out(x, quant) if has_next else (out, out)
    g, stride_g = _per_batch(gate, b, d, x)
    ns, stride_ns = _per_batch(next_scale, b, d, x)
    nw = next_weight.contiguous() if has_next else weight
    block = triton.next_power_of_2(d)
    _gated_residual_kernel[(b * n,)](
        x, y, g, weight.contiguous(), nw, ns, out, nout, nqs, d, n, stride_g, stride_ns, eps, BLOCK_D=block,
        CLAMP=y.dtype == torch.float16, HAS_GATE=gate is not None, HAS_NEXT=has_next,
        HAS_NEXT_SCALE=next_scale is not None, QUANT=quant, num_warps=_warps(block))
    if not has_next:
        return out, None
    return out, ((nout, nqs) if quant else nout)


def qk_norm_rope_(qkv: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, rope: torch.Tensor, eps: float) -> None:
    """In place. qkv (B, N, 3, H, HD) contiguous; rope (Bt, N, HD/2, 2, 2) with Bt in (1, B)."""
    b, n, _, h, hd = qkv.shape
    rope = rope.contiguous()
    stride_rb = 0 if rope.shape[0] == 1 else rope.stride(0)
    _qk_norm_rope_kernel[(b * n, 2)](qkv, wq.contiguous(), wk.contiguous(), rope, n, h, qkv.stride(1),
                                     qkv.stride(2), stride_rb, rope.stride(1), eps,
                                     HP=triton.next_power_of_2(h), HD=hd, num_warps=4)


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty_like(a)
    numel = a.numel()
    block = 2048
    _silu_mul_kernel[(triton.cdiv(numel, block),)](a, b, out, numel, BLOCK=block, CLAMP=a.dtype == torch.float16,
                                                   num_warps=8)
    return out


def silu_mul_quant(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(a) * b for (..., F) a, b: (e4m3 (..., F), per-row scales (rows, 1) float32)."""
    a, b = a.contiguous(), b.contiguous()
    d = a.shape[-1]
    out, qs = _quant_out(a, True)
    block = triton.next_power_of_2(d)
    _silu_mul_quant_kernel[(a.numel() // d,)](a, b, out, qs, d, BLOCK_D=block, CLAMP=a.dtype == torch.float16,
                                               num_warps=_warps(block))
    return out, qs
