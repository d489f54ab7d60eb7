"""fp8 (e4m3) flash attention in Triton, forward only (see `fp8_attention.py` for when it is used).

Quantization: q and k with one scale per (batch, head, token) row, v with one scale per (batch, head,
channel); the scales are exact algebra around the fp8 dot products (logits_ij = sq_i * sk_j * q8_i.k8_j,
out_d = sv_d * sum_j p_ij v8_jd), so only the values' 3-bit mantissas round. Probabilities are fed to
the second dot product in e4m3 too, scaled by 256 (exp2(s - max + 8)) so small ones stay out of e4m3's
subnormal range; the row sum carries the same factor. Accumulation is fp32. The output is written in
(B, N, H, D) layout, which the out-projection reads without a transpose copy.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FP8_MAX = 448.0
LOG2E = 1.4426950408889634


@triton.jit
def _quant_rows_kernel(Q, K, KM, Q8, K8, QS, KS, N, H, sqb, sqn, sqh, skb, skn, skh,
                       HP: tl.constexpr, HD: tl.constexpr):
    """q, k (B, N, H, HD) strided -> e4m3 (B, H, N, HD) contiguous with per-row scales (B, H, N);
    k minus its mean over the tokens KM (B, H, HD) first."""
    tok = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    b = tok // N
    n = tok % N
    heads = tl.arange(0, HP)
    dims = tl.arange(0, HD)
    hm = heads < H
    if part == 0:
        src = Q + b * sqb + n * sqn + heads[:, None] * sqh + dims[None, :]
        dst, sc = Q8, QS
    else:
        src = K + b * skb + n * skn + heads[:, None] * skh + dims[None, :]
        dst, sc = K8, KS
    x = tl.load(src, mask=hm[:, None], other=0.0).to(tl.float32)
    if part == 1:
        x -= tl.load(KM + (b * H + heads[:, None]) * HD + dims[None, :], mask=hm[:, None], other=0.0)
    s = tl.maximum(tl.max(tl.abs(x), axis=1) / 448.0, 1e-12)
    row = (b * H + heads) * N + n  # (b, h, n) row index
    tl.store(dst + row[:, None] * HD + dims[None, :], (x / s[:, None]).to(dst.dtype.element_ty), mask=hm[:, None])
    tl.store(sc + row, s, mask=hm)


@triton.jit
def _quant_v_kernel(V, VM, VS, V8T, N, H, svb, svn, svh, HD: tl.constexpr, BLOCK_N: tl.constexpr):
    """v (B, N, H, HD) strided minus its mean VM, scales (B, H, HD) -> e4m3 (B, H, HD, N) (tokens
    contiguous: the layout fp8 tensor-core dots need for the second operand)."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HD)
    m = offs_n < N
    x = tl.load(V + b * svb + offs_n[:, None] * svn + h * svh + dims[None, :], mask=m[:, None], other=0.0)
    s = tl.load(VS + bh * HD + dims)
    y = ((x.to(tl.float32) - tl.load(VM + bh * HD + dims)[None, :]) / s[None, :]).to(V8T.dtype.element_ty)
    tl.store(V8T + bh * HD * N + dims[None, :] * N + offs_n[:, None], y, mask=m[:, None])


@triton.jit
def _attn_step(acc, l_i, m_i, q, qs, K8, KS, V8T, kv_base, ks_base, start_n, N, offs_n, dims,
               HD: tl.constexpr, MASKED: tl.constexpr, P_FP8: tl.constexpr):
    cols = start_n + offs_n
    valid = cols < N
    k_ptrs = K8 + kv_base + cols[None, :] * HD + dims[:, None]  # (HD, BLOCK_N): k transposed
    v_ptrs = V8T + kv_base + dims[None, :] * N + cols[:, None]  # (BLOCK_N, HD)
    if MASKED:
        k = tl.load(k_ptrs, mask=valid[None, :], other=0.0)
        ks = tl.load(KS + ks_base + cols, mask=valid, other=0.0)
    else:
        k = tl.load(k_ptrs)
        ks = tl.load(KS + ks_base + cols)
    s = tl.dot(q, k) * qs[:, None] * ks[None, :]
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None] + 8.0)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASKED:
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    if P_FP8:
        acc = tl.dot(p.to(v.dtype), v, acc)
    else:  # probabilities in fp16 (p <= 256; e4m3 values are exact in fp16)
        acc = tl.dot(p.to(tl.float16), v.to(tl.float16), acc)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(Q8, K8, V8T, QS, KS, VS, VM, OUT, N, H, qk_scale,
                     HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, P_FP8: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HD)
    mrow = offs_m < N
    kv_base = bh * N * HD
    q = tl.load(Q8 + kv_base + offs_m[:, None] * HD + dims[None, :], mask=mrow[:, None], other=0.0)
    qs = tl.load(QS + bh * N + offs_m, mask=mrow, other=0.0) * qk_scale
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD], tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, qs, K8, KS, V8T, kv_base, bh * N, start_n, N, offs_n, dims,
                                   HD, False, P_FP8)
    if n_full < N:
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, qs, K8, KS, V8T, kv_base, bh * N, n_full, N, offs_n, dims,
                                   HD, True, P_FP8)
    vs = tl.load(VS + bh * HD + dims)
    out = acc / l_i[:, None] * vs[None, :] + tl.load(VM + bh * HD + dims)[None, :]
    o_ptrs = OUT + (b * N + offs_m[:, None]) * (H * HD) + h * HD + dims[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=mrow[:, None])


_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
]
_attn_fwd_tuned = triton.autotune(configs=_CONFIGS, key=["N", "HD"])(_attn_fwd_kernel)


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v (B, N, H, HD) (strided views allowed, last dim contiguous) -> e4m3 q8, k8 (B, H, N, HD),
    v8t (B, H, HD, N), float32 scales qs, ks (B, H, N), vs (B, H, HD), and v's mean vm (B, H, HD).

    k and v are centred on their means over the tokens first (exact: a constant added to every logit of
    a row leaves its softmax unchanged, and each row of probabilities sums to 1, so P(v - vm) + vm = Pv);
    a common offset then costs no fp8 range."""
    b, n, h, hd = q.shape
    fp8 = torch.float8_e4m3fn
    q8 = torch.empty(b, h, n, hd, device=q.device, dtype=fp8)
    k8 = torch.empty_like(q8)
    qs = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    ks = torch.empty_like(qs)
    km = k.mean(dim=1, dtype=torch.float32).contiguous()  # (B, H, HD)
    _quant_rows_kernel[(b * n, 2)](q, k, km, q8, k8, qs, ks, n, h, q.stride(0), q.stride(1), q.stride(2),
                                   k.stride(0), k.stride(1), k.stride(2), HP=triton.next_power_of_2(h), HD=hd,
                                   num_warps=4)
    vm = v.mean(dim=1, dtype=torch.float32).contiguous()  # (B, H, HD)
    spread = torch.maximum(v.amax(dim=1).float() - vm, vm - v.amin(dim=1).float())
    vs = (spread / FP8_MAX).clamp_(min=1e-12).contiguous()
    v8t = torch.empty(b, h, hd, n, device=q.device, dtype=fp8)
    block = 16 if INTERPRET else 64
    _quant_v_kernel[(triton.cdiv(n, block), b * h)](v, vm, vs, v8t, n, h, v.stride(0), v.stride(1), v.stride(2),
                                                    HD=hd, BLOCK_N=block, num_warps=4)
    return q8, k8, v8t, qs, ks, vs, vm


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                  p_fp8: bool = True, quantized: tuple | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over (B, N, H, HD) views; returns (B, N, H, HD) in q's dtype.
    `p_fp8=False` multiplies the probabilities in fp16 instead of e4m3; `quantized` takes the output
    of `quantize_qkv` (or an equivalent) instead of quantizing q, k, v here (tests)."""
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, n, h, hd = q.shape
    q8, k8, v8t, qs, ks, vs, vm = quantized if quantized is not None else quantize_qkv(q, k, v)
    out = torch.empty(b, n, h, hd, device=q.device, dtype=q.dtype)
    qk_scale = (scale if scale is not None else hd ** -0.5) * LOG2E
    if INTERPRET:
        _attn_fwd_kernel[(triton.cdiv(n, 16), b * h)](q8, k8, v8t, qs, ks, vs, vm, out, n, h, qk_scale,
                                                      HD=hd, BLOCK_M=16, BLOCK_N=16, P_FP8=p_fp8)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h)  # noqa: E731
        _attn_fwd_tuned[grid](q8, k8, v8t, qs, ks, vs, vm, out, n, h, qk_scale, HD=hd, P_FP8=p_fp8)
    return out
