"""Optional fp8 attention for the transformer (off by default; `ZImageTransformer.set_fp8_attention`).

q and k are quantized to float8_e4m3fn with one scale per (batch, head, token), v with one scale per
(batch, head, channel); the product runs on fp8 tensor cores in a Triton flash-attention kernel
(`triton_attention.py`, Hopper/Ada/Blackwell), fp32 accumulation, output in the compute dtype.

Where that kernel cannot run (CPU, no Triton, GPUs without fp8, a key-padding mask from prompts of
different lengths) the reference path runs instead: the same quantization of q, k, v, then PyTorch's
SDPA on the dequantized values. It shows the quantization error on any device; it is not faster.

Under torch.compile the kernel is an opaque custom op (`zimage::fp8_attention`), so compiled blocks keep it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .kernels import triton_failure

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_triton_attn = False  # False: not looked up; None: unavailable


def _kernel_module():
    global _triton_attn
    if _triton_attn is False:
        try:
            from . import triton_attention
            _triton_attn = triton_attention
        except Exception as exc:  # noqa: BLE001 - no Triton: the reference path
            log.debug("Triton fp8 attention unavailable (%s).", exc)
            _triton_attn = None
    return _triton_attn


def kernel_supported(q: torch.Tensor) -> bool:
    """fp8 tensor-core attention needs CUDA compute capability >= 8.9 and Triton (or its interpreter)."""
    mod = _kernel_module()
    if mod is None:
        return False
    if q.device.type == "cpu":
        return bool(mod.INTERPRET)
    return q.is_cuda and torch.cuda.get_device_capability(q.device) >= (8, 9)


def quantize_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, N, H, D) -> fp8 round trips (dequantized, float32) with the kernel's quantization:
    per-row scales for q and for k minus its token mean (softmax ignores that shift, so the mean is not
    added back), per-channel scales for v minus its token mean (added back: probabilities sum to 1)."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        s = (t.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_(min=1e-12)
        return (t / s).to(FP8).float() * s
    kc = k.float() - k.float().mean(1, keepdim=True)
    vm = v.float().mean(1, keepdim=True)
    vc = v.float() - vm
    s = (vc.abs().amax(1, keepdim=True) / FP8_MAX).clamp_(min=1e-12)
    return rows(q.float()), rows(kc), (vc / s).to(FP8).float() * s + vm


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA on the fp8 round trips of q, k, v (B, N, H, D); returns (B, N, H, D) in q's dtype."""
    qd, kd, vd = (t.to(q.dtype).transpose(1, 2) for t in quantize_reference(q, k, v))
    return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask).transpose(1, 2)


def _op_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Runs eagerly even inside compiled blocks (an opaque custom op), so device checks are made here.
    global _triton_attn
    if kernel_supported(q):
        try:
            return _kernel_module().fp8_attention(q, k, v)
        except Exception as exc:
            if not triton_failure(exc):
                raise
            _triton_attn = None  # the emulation from now on
            log.warning("Z-Image fp8 attention kernel failed (%s: %s); using its torch emulation.",
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
    return attention_reference(q, k, v).contiguous()


try:
    _op = torch.library.custom_op("zimage::fp8_attention", mutates_args=())(_op_impl)

    @_op.register_fake
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return q.new_empty(q.shape)
except Exception as exc:  # noqa: BLE001 - old torch without torch.library.custom_op: call it directly
    log.debug("custom op registration failed (%s)", exc)
    _op = _op_impl


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Attention of q, k, v (B, N, H, D) through fp8; returns (B, N, H, D) in q's dtype.

    Key-padding masks (prompts of different lengths in one batch) and autograd take the emulation."""
    d = q.shape[-1]
    if (mask is None and q.ndim == 4 and q.shape == k.shape == v.shape and q.dtype in (torch.bfloat16, torch.float16)
            and d >= 16 and d & (d - 1) == 0
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return _op(q, k, v)
    return attention_reference(q, k, v, mask)
