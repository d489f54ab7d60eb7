"""Attention backends behind the transformer's attention seam (zimage_core.accel.attention_backends).

The GPU kernels (cuDNN fp8, FlashAttention-4/3, FlashInfer) run only on a GPU: bench/bench.py's `attn` stage
checks each against fp32 attention there. On the CPU: every backend computes attention (optional ones hand CPU
calls to SDPA) against float64 math written here; a missing package is a clear error naming it, and a default
naming one falls back to SDPA with a warning; the emulation of cuDNN's per-tensor fp8 rounding (what the GPU
check compares the kernel with) stays within fp8's error of float64 attention.
"""

from __future__ import annotations

import importlib.util
import logging
import math

import pytest
import torch

from zimage_core.accel import attention_backends as ab
from zimage_core.transformer import attention as seam


def _qkv(seed: int = 0, b: int = 2, n: int = 37, h: int = 3, d: int = 64, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, h, d, generator=g).to(dtype) for _ in range(3)]


def _attention64(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d)) v in float64, per batch and head; mask (B, 1, 1, N) True = attend."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    out = torch.softmax(s, -1) @ v
    return out.transpose(1, 2).flatten(2)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("name", [n for n in ab.NAMES if n != "triton_fp8"])
def test_every_backend_computes_attention(name):
    try:
        backend = ab.get(name)
    except ImportError as exc:
        assert ab.PACKAGES[name].split()[0] in str(exc)  # the message names what to install
        pytest.skip(f"{name}: {exc}")
    q, k, v = _qkv()
    mask = torch.ones(2, 1, 1, 37, dtype=torch.bool)
    mask[1, ..., 30:] = False  # the second prompt is shorter: its padding is not attended to
    for m in (None, mask):
        out = backend(q, k, v, m)
        assert out.shape == (2, 37, 3 * 64)
        assert _rel(out, _attention64(q, k, v, m)) < 1e-5


def test_unknown_and_missing_backends_say_what_to_do():
    with pytest.raises(ValueError, match="unknown backend 'flash5'.*sdpa"):
        ab.get("flash5")
    status = ab.available()
    assert status["sdpa"] == "ok" and set(status) == set(ab.NAMES)
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match="flash-attn-4"):
            ab.get("fa4")
        assert status["fa4"] != "ok"


def test_default_comes_from_the_environment_and_a_missing_one_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(seam, "_default", None)
    monkeypatch.setenv("ZIMAGE_ATTENTION", "sdpa_efficient")
    with caplog.at_level(logging.INFO, logger="zimage_core.accel.attention_backends"):
        assert seam.default() is ab.get("sdpa_efficient")
    assert "Z-Image attention backend: sdpa_efficient" in caplog.text
    monkeypatch.setattr(seam, "_default", None)
    monkeypatch.setenv("ZIMAGE_ATTENTION", "no_such_kernel")
    with caplog.at_level(logging.WARNING, logger="zimage_core.accel.attention_backends"):
        assert seam.default() is ab.sdpa
    assert "unknown backend 'no_such_kernel'" in caplog.text
    monkeypatch.delenv("ZIMAGE_ATTENTION")
    monkeypatch.setattr(seam, "_default", None)
    assert ab.default_name() == "sdpa"  # no GPU here; Hopper's table entry is SDPA too
    assert ab.DEFAULTS[(9, 0)] == "sdpa"


def test_cudnn_fp8_emulation_stays_within_fp8_error():
    """Per-tensor e4m3 q, k, v, probabilities and output: a few % of float64 attention on normed q/k (as the
    block feeds it), ten times bf16's error or more, never NaN."""
    q, k, v = _qkv(3, n=64, d=128, dtype=torch.bfloat16)
    q, k = (torch.nn.functional.rms_norm(t.float(), (128,)).to(torch.bfloat16) for t in (q, k))
    want = _attention64(q, k, v)
    got = ab.cudnn_fp8_reference(q, k, v)
    bf16 = _rel(ab.sdpa(q, k, v, None), want)
    err = _rel(got, want)
    assert torch.isfinite(got).all()
    assert 3 * bf16 < err < 0.08, (err, bf16)
    q8, dq = ab.fp8_tensor_quant(q)
    assert q8.dtype == torch.float8_e4m3fn and q8.float().abs().max() == 448.0
    assert _rel(q8.float() * dq.reshape(()), q) < 0.05
