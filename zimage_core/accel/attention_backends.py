"""Attention backends for the transformer's attention seam (`zimage_core.transformer.attention`).

Each backend is an `AttentionBackend`: `(q, k, v, mask) -> out` with q, k, v (B, N, H, D) after q/k norm and
RoPE, mask (B, 1, 1, N) bool or None, out (B, N, H * D). Every optional package is imported only when its
backend is asked for (`get(name)`); `available()` says which can run here and why not. A backend that cannot
take a call (CPU tensors, a key-padding mask, a dtype or head size it lacks) hands it to PyTorch's SDPA, so
any of them can be the process default.

| name | what runs | package |
|---|---|---|
| `sdpa` | PyTorch SDPA, its own dispatch (cuDNN on Hopper with torch 2.11) | torch |
| `sdpa_cudnn`, `sdpa_flash`, `sdpa_efficient` | PyTorch SDPA forced to one kernel | torch |
| `fa4` | FlashAttention-4 (CuTe DSL), `flash_attn.cute.flash_attn_func` | flash-attn-4, nvidia-cutlass-dsl |
| `fa3` | FlashAttention-3 (Hopper), `flash_attn_interface.flash_attn_func` | flash-attn 3 (hopper build) |
| `flashinfer` | FlashInfer single prefill (FA3 backend on Hopper) | flashinfer-python |
| `cudnn_fp8` | cuDNN's fp8 flash attention (cudnn-frontend graph): per-tensor e4m3 q, k, v, fp8 output | nvidia-cudnn-frontend |
| `triton_fp8` | our Triton fp8 kernel (`accel.fp8_attention`, per-token scales) | triton |

The default is the table `DEFAULTS` (by CUDA compute capability; `sdpa` elsewhere), or the backend named by
`ZIMAGE_ATTENTION` in the environment. A backend becomes a default only when the bench (`bench/bench.py`,
`kernels` stage) shows it faster than cuDNN SDPA with an error against fp32 attention no worse than cuDNN bf16's.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0

# The measured default by compute capability (bench/RESULTS.md, issue 21). Hopper keeps PyTorch's SDPA (cuDNN)
# until a run shows a backend faster at no larger error.
DEFAULTS: dict[tuple[int, int], str] = {(9, 0): "sdpa"}

# What each optional backend needs, for the messages.
PACKAGES = {"fa4": "flash-attn-4 (and nvidia-cutlass-dsl)", "fa3": "flash-attn 3 (flash_attn_interface)",
            "flashinfer": "flashinfer-python", "cudnn_fp8": "nvidia-cudnn-frontend", "triton_fp8": "triton"}


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    b, n = q.shape[:2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, -1)


def _gpu_call(q: torch.Tensor, mask: torch.Tensor | None, dtypes=(torch.bfloat16, torch.float16)) -> bool:
    """Whether an optional GPU kernel may take this call (else: SDPA)."""
    return (q.is_cuda and mask is None and q.dtype in dtypes and q.shape[-1] in (64, 128, 256)
            and not (torch.is_grad_enabled() and q.requires_grad))


def _forced_sdpa(kind: str) -> Backend:
    def run(q, k, v, mask):
        if not q.is_cuda:
            return sdpa(q, k, v, mask)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(getattr(SDPBackend, kind)):
            return sdpa(q, k, v, mask)
    return run


def _flash_api(fn) -> Backend:
    """FlashAttention's (b, s, h, d) function API (FA3 and FA4 share it), SDPA where it cannot run."""
    def run(q, k, v, mask):
        if not _gpu_call(q, mask):
            return sdpa(q, k, v, mask)
        out = fn(q, k, v, softmax_scale=1.0 / math.sqrt(q.shape[-1]), causal=False)
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(q.shape[0], q.shape[1], -1)
    return run


def _fa4() -> Backend:
    return _flash_api(importlib.import_module("flash_attn.cute").flash_attn_func)


def _fa3() -> Backend:
    return _flash_api(importlib.import_module("flash_attn_interface").flash_attn_func)


def _flashinfer() -> Backend:
    fi = importlib.import_module("flashinfer")

    def run(q, k, v, mask):
        if not _gpu_call(q, mask):
            return sdpa(q, k, v, mask)
        outs = [fi.single_prefill_with_kv_cache(q[i], k[i], v[i], causal=False, kv_layout="NHD")
                for i in range(q.shape[0])]
        return torch.stack(outs, 0).reshape(q.shape[0], q.shape[1], -1)
    return run


def _triton_fp8() -> Backend:
    from . import fp8_attention as fa
    if fa._kernel_module() is None:
        raise ImportError("triton is not importable")

    def run(q, k, v, mask):
        return fa.fp8_attention(q, k, v, mask).reshape(q.shape[0], q.shape[1], -1)
    return run


# ---------------------------------------------------------------------------------------------
# cuDNN fp8 flash attention through cudnn-frontend
# ---------------------------------------------------------------------------------------------

def fp8_tensor_quant(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One e4m3 scale for the whole tensor (what cuDNN's fp8 attention takes): (t * scale → e4m3, 1 / scale as a
    (1, 1, 1, 1) float32 tensor). The scale stays on the device: no host sync."""
    amax = t.abs().amax().float().clamp_(min=1e-12)
    scale = FP8_MAX / amax
    return (t.float() * scale).to(FP8), (1.0 / scale).reshape(1, 1, 1, 1)


def cudnn_fp8_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What `cudnn_fp8` computes, in plain torch (any device): per-tensor e4m3 round trips of q, k, v and of the
    probabilities (scaled by 448 into e4m3's range), fp32 softmax and sums, output rounded to e4m3 with the scale
    max|v| allows (|out| <= max|v|). Returns (B, N, H * D) in q's dtype."""
    b, n, h, d = q.shape
    rt = [qq.float() * s.reshape(()) for qq, s in (fp8_tensor_quant(t) for t in (q, k, v))]
    qf, kf, vf = (t.transpose(1, 2) for t in rt)
    p = torch.softmax(qf @ kf.transpose(-1, -2) / math.sqrt(d), dim=-1)
    p = (p * FP8_MAX).to(FP8).float() / FP8_MAX
    out = (p @ vf).transpose(1, 2)
    vmax = v.abs().amax().float().clamp(min=1e-12)
    out = (out * (FP8_MAX / vmax)).to(FP8).float() * (vmax / FP8_MAX)
    return out.reshape(b, n, h * d).to(q.dtype)


class _CudnnFp8:
    """cuDNN fp8 SDPA forward: e4m3 q, k, v with one scale each, probabilities scaled by 448, output in e4m3 with
    scale 448 / max|v| (exact bound: each output row is a convex combination of v's rows), dequantized to bf16.
    One cudnn-frontend graph per shape, built on first use."""

    def __init__(self) -> None:
        self.cudnn = importlib.import_module("cudnn")
        self._graphs: dict[tuple, Any] = {}
        self._handles: dict[int, Any] = {}
        self._consts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _graph(self, shape: tuple[int, ...], device: torch.device) -> tuple[Any, dict[str, Any], int]:
        key = (shape, device)
        if key in self._graphs:
            return self._graphs[key]
        cudnn = self.cudnn
        handle = self._handle(device)
        b, n, h, d = shape
        dims, strides = (b, h, n, d), (n * h * d, d, h * d, 1)  # (B, N, H, D) memory seen as (B, H, N, D)
        e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
        t = {name: g.tensor(name=name, dim=dims, stride=strides, data_type=e4m3) for name in ("q", "k", "v")}
        for name in ("dq", "dk", "dv", "ds", "ss", "so"):
            t[name] = g.tensor(name=name, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=f32)
        o, _, amax_s, amax_o = g.sdpa_fp8(q=t["q"], k=t["k"], v=t["v"], descale_q=t["dq"], descale_k=t["dk"],
                                          descale_v=t["dv"], descale_s=t["ds"], scale_s=t["ss"], scale_o=t["so"],
                                          attn_scale=1.0 / math.sqrt(d), generate_stats=False, use_causal_mask=False,
                                          name="zimage_sdpa_fp8")
        o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(e4m3)
        for a in (amax_s, amax_o):
            a.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
        t.update(o=o, amax_s=amax_s, amax_o=amax_o)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self._graphs[key] = (g, t, int(g.get_workspace_size()))
        log.info("Z-Image attention: cuDNN fp8 SDPA graph built for (B, N, H, D) = %s", shape)
        return self._graphs[key]

    def _handle(self, device: torch.device) -> Any:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in self._handles:
            with torch.cuda.device(idx):
                self._handles[idx] = self.cudnn.create_handle()
        return self._handles[idx]

    def __call__(self, q, k, v, mask):
        if not _gpu_call(q, mask, (torch.bfloat16,)):
            return sdpa(q, k, v, mask)
        b, n, h, d = q.shape
        g, t, ws = self._graph((b, n, h, d), q.device)
        q8, dq = fp8_tensor_quant(q)
        k8, dk = fp8_tensor_quant(k)
        v8, dv = fp8_tensor_quant(v)
        # out = o8 * (1 / scale_o); scale_o = 448 / max|v| = 1 / dv: the output descale is dv itself
        consts = self._consts.get(q.device)
        if consts is None:
            consts = self._consts[q.device] = (torch.full((1, 1, 1, 1), 1.0 / FP8_MAX, device=q.device),
                                               torch.full((1, 1, 1, 1), FP8_MAX, device=q.device))
        ds, ss = consts
        so = 1.0 / dv
        o8 = torch.empty((b, n, h, d), dtype=FP8, device=q.device)
        amax = torch.empty((2, 1, 1, 1, 1), dtype=torch.float32, device=q.device)
        workspace = torch.empty(max(ws, 1), dtype=torch.uint8, device=q.device)
        handle = self._handle(q.device)
        self.cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        g.execute({t["q"]: q8, t["k"]: k8, t["v"]: v8, t["dq"]: dq, t["dk"]: dk, t["dv"]: dv, t["ds"]: ds,
                   t["ss"]: ss, t["so"]: so, t["o"]: o8, t["amax_s"]: amax[0], t["amax_o"]: amax[1]},
                  workspace, handle=handle)
        return (o8.float() * dv.reshape(())).to(q.dtype).reshape(b, n, h * d)


_FACTORIES: dict[str, Callable[[], Backend]] = {
    "sdpa": lambda: sdpa,
    "sdpa_cudnn": lambda: _forced_sdpa("CUDNN_ATTENTION"),
    "sdpa_flash": lambda: _forced_sdpa("FLASH_ATTENTION"),
    "sdpa_efficient": lambda: _forced_sdpa("EFFICIENT_ATTENTION"),
    "fa4": _fa4,
    "fa3": _fa3,
    "flashinfer": _flashinfer,
    "cudnn_fp8": _CudnnFp8,
    "triton_fp8": _triton_fp8,
}
NAMES = tuple(_FACTORIES)
_built: dict[str, Backend] = {}


def get(name: str) -> Backend:
    """The backend called `name` (built once). Raises ValueError for an unknown name and ImportError, naming the
    package to install, when its package is missing."""
    if name not in _FACTORIES:
        raise ValueError(f"Z-Image attention: unknown backend {name!r}; choose one of {', '.join(NAMES)}.")
    if name not in _built:
        try:
            _built[name] = _FACTORIES[name]()
        except Exception as exc:  # noqa: BLE001 - a missing or broken optional package
            raise ImportError(f"Z-Image attention backend {name!r} needs {PACKAGES.get(name, 'torch')}, which could "
                              f"not be loaded here ({type(exc).__name__}: {exc}).") from exc
    return _built[name]


def available() -> dict[str, str]:
    """name -> "ok" or why it cannot run here (importing each optional package once)."""
    out = {}
    for name in NAMES:
        try:
            get(name)
            out[name] = "ok"
        except ImportError as exc:
            out[name] = str(exc.__cause__ or exc)[:200]
    return out


def default_name() -> str:
    """`ZIMAGE_ATTENTION` if set, else the `DEFAULTS` entry of this process's CUDA device, else "sdpa"."""
    name = os.environ.get("ZIMAGE_ATTENTION", "").strip()
    if name:
        return name
    with contextlib.suppress(Exception):
        if torch.cuda.is_available():
            return DEFAULTS.get(torch.cuda.get_device_capability(), "sdpa")
    return "sdpa"


def pick_default() -> Backend:
    """The process default backend, with one log line saying which runs (a missing optional package: a
    warning, and SDPA)."""
    name = default_name()
    try:
        backend = get(name)
    except (ValueError, ImportError) as exc:
        log.warning("%s Using PyTorch SDPA.", exc)
        name, backend = "sdpa", sdpa
    log.info("Z-Image attention backend: %s", name)
    return backend
