"""GGML block quantisations -> float tensors, in torch (CPU or GPU), for GGUF weights kept quantised.

Each supported type's bytes are a sequence of fixed-size blocks (`BLOCK_SIZES`: elements and bytes per
block). The arithmetic is float32 and in the same order as the format's reference (llama.cpp's
`dequantize_row_*`, mirrored by the `gguf` package's numpy `gguf.quants.dequantize`), so the result is the
same to the bit on every device; it is then cast to the dtype asked for. Scales are fp16 bytes; every
integer part is exact in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

QK_K = 256  # elements per super-block of the K-quants

# name -> (elements per block, bytes per block); GGML's type ids beside them (the file stores the id).
BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (QK_K, 84), "Q3_K": (QK_K, 110), "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210),
}
TYPE_IDS: dict[int, str] = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
                            10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16"}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 number at byte `start` of each block, as float32, shape (n, 1)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).to(torch.float32)


def _mul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a * b computed in float32 (integer factors converted exactly, in the same kernel) and stored in `dtype`:
    one pass over the output instead of a float32 tensor and a cast (same bits as multiplying, then casting)."""
    out = torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=dtype, device=a.device)
    return torch.mul(a, b, out=out)


def _sub(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=dtype, device=a.device)
    return torch.sub(a, b, out=out)


def _add(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=dtype, device=a.device)
    return torch.add(a, b, out=out)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) bytes -> (n, 32): the 16 low nibbles, then the 16 high ones (the 32-block layout)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """(n, count/8) bytes, read as a little-endian bit field -> (n, count) bits (element j = bit j)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], count)


def _q8_0(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _mul(b[:, 2:].contiguous().view(torch.int8), _f16(b, 0), dtype)


def _q4_0(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q = _nibbles(b[:, 2:]).to(torch.int8) - 8
    return _mul(_f16(b, 0), q, dtype)


def _q4_1(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q = _nibbles(b[:, 4:])
    return _add(_f16(b, 0) * q, _f16(b, 2), dtype)


def _q5(b: torch.Tensor, at: int) -> torch.Tensor:
    return _nibbles(b[:, at + 4:]) | (_bits(b[:, at:at + 4], 32) << 4)


def _q5_0(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q = _q5(b, 2).to(torch.int8) - 16
    return _mul(_f16(b, 0), q, dtype)


def _q5_1(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _add(_f16(b, 0) * _q5(b, 4), _f16(b, 2), dtype)


def _crumbs(qs: torch.Tensor, width: int) -> torch.Tensor:
    """K-quant 2-bit fields: (n, k*width) bytes -> (n, k, 4, width) with the 4 shifts (0, 2, 4, 6) in turn."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device).view(1, 1, 4, 1)
    return (qs.reshape(qs.shape[0], -1, 1, width) >> shifts) & 3


def _q2_k(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, :16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = _crumbs(b[:, 16:80], 32).reshape(n, 16, 16)
    return _sub(dl * q, ml, dtype).reshape(n, QK_K)


def _q3_k(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, packed = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    # 16 six-bit scales: low 4 bits from bytes 0-7 (low nibbles, then high nibbles), high 2 bits from
    # bytes 8-11 (2-bit fields, shift by shift).
    low = torch.cat((packed[:, :8] & 0x0F, packed[:, :8] >> 4), dim=1)
    high = _crumbs(packed[:, 8:12], 4).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (d * scales).reshape(n, 16, 1)
    ql = _crumbs(qs, 32).reshape(n, 16, 16)
    # A set hmask bit means no offset; a clear one subtracts 4.
    hbit = ((hmask.reshape(n, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 1, 8, 1)) & 1)
    hbit = hbit.reshape(n, 16, 16)
    q = ql.to(torch.int8) - ((hbit ^ 1) << 2).to(torch.int8)
    return _mul(dl, q, dtype).reshape(n, QK_K)


def _scale_min_k4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins."""
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc, mn


def _k4_low(qs: torch.Tensor) -> torch.Tensor:
    """(n, 128) bytes -> (n, 8, 32): per 32-byte chunk its low nibbles, then its high nibbles."""
    n = qs.shape[0]
    q = qs.reshape(n, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8, device=qs.device).view(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, 8, 32)


def _q4_k(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.to(torch.float32)).reshape(n, 8, 1)
    q = _k4_low(b[:, 16:144])
    return _sub(d * q, dm, dtype).reshape(n, QK_K)


def _q5_k(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.to(torch.float32)).reshape(n, 8, 1)
    high = _bits(b[:, 16:48], 256).reshape(n, 32, 8).transpose(1, 2)  # bit g of byte j -> (g, j)
    q = _k4_low(b[:, 48:176]) | (high << 4)
    return _sub(d * q, dm, dtype).reshape(n, QK_K)


def _q6_k(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    low = (ql.reshape(n, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8, device=b.device).view(1, 1, 2, 1))
    low = (low & 0x0F).reshape(n, 8, 32)
    high = _crumbs(qh, 32).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16)
    return _mul(d, q, dtype).reshape(n, QK_K)


_BLOCK_FUNCS: dict[str, Callable[[torch.Tensor, torch.dtype], torch.Tensor]] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}
QUANT_TYPES = frozenset(_BLOCK_FUNCS)


def packed_bytes(qtype: str, shape: Sequence[int]) -> int:
    """Bytes that a tensor of `shape` takes in `qtype` (its last dimension must be whole blocks)."""
    elems, size = BLOCK_SIZES[qtype]
    numel = 1
    for d in shape:
        numel *= d
    return numel // elems * size


def dequantize(raw: torch.Tensor, qtype: str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor of `shape` whose `qtype` bytes are `raw` (uint8, any shape, contiguous), in `dtype`, on
    raw's device. Float types are reinterpreted; block types are dequantised in float32 first."""
    raw = raw.reshape(-1)
    if qtype in FLOAT_TYPES:
        return raw.view(FLOAT_TYPES[qtype]).reshape(tuple(shape)).to(dtype)
    elems, size = BLOCK_SIZES[qtype]
    # The last operation (float32 math) writes `dtype` directly: the float32 result is never stored.
    return _BLOCK_FUNCS[qtype](raw.reshape(-1, size), dtype).reshape(tuple(shape))
