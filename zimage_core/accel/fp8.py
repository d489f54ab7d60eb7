"""fp8 weights for the block matmuls: float8_e4m3fn with per-row scales on fp8 tensor cores
(`torch._scaled_mm`, per-token activation scales); elsewhere dequantized on the fly."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0



class Fp8Act(NamedTuple):
    """An activation already quantised for `Fp8Linear` by the kernel that produced it (accel.kernels with
    `quant`): e4m3 values (rows, K), one float32 scale per row (rows, 1), the activation's shape and dtype."""

    data: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype

    def dequantized(self) -> torch.Tensor:
        return (self.data.float().reshape(-1, self.shape[-1]) * self.scale).reshape(self.shape).to(self.dtype)


def fp8_matmul_supported(device: torch.device) -> bool:
    """fp8 tensor-core matmuls need CUDA compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """A bias-free Linear whose weight is stored as float8_e4m3fn with one float32 scale per output row.

    forward: activations are quantized per token (row) to fp8 and multiplied on fp8 tensor cores
    (`torch._scaled_mm`, row-wise scales, bf16 output). Without fp8 matmul support the weight is
    dequantized for an ordinary matmul in the activation dtype.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach()
        scale = (w.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_(min=1e-12)
        self.weight = nn.Parameter((w.float() / scale).to(FP8), requires_grad=False)
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())
        self.in_features = w.shape[1]
        self.out_features = w.shape[0]
        self.use_scaled_mm = fp8_matmul_supported(w.device)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale.reshape(-1, 1)).to(dtype)

    # Weight patching by a host (ComfyUI's LoRA loaders read `convert_weight` / `set_weight`, as for its own
    # scaled-fp8 layers): a patch is computed on the real weight and stored back with the same row scales.
    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs: Any) -> torch.Tensor:
        """The stored (scaled) weight values → the real weight, in float32 (or in place)."""
        scale = self.weight_scale.reshape(-1, 1).to(weight.device)
        if inplace:
            return weight.mul_(scale.to(weight.dtype))
        return weight.float() * scale

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed: int | None = None,
                   return_weight: bool = False, **kwargs: Any) -> torch.Tensor | None:
        """A real (e.g. LoRA-patched) weight → stored fp8 with this layer's row scales (clipped to e4m3's range)."""
        scale = self.weight_scale.reshape(-1, 1).to(weight.device)
        stored = (weight.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        if return_weight:
            return stored
        if inplace_update:
            self.weight.data.copy_(stored.to(self.weight.device))
        else:
            self.weight = nn.Parameter(stored, requires_grad=False)
        return None

    def forward(self, x: torch.Tensor | Fp8Act) -> torch.Tensor:
        if isinstance(x, Fp8Act):  # quantised by the producing kernel: straight to the fp8 matmul
            if not (self.use_scaled_mm and x.data.is_cuda):
                return F.linear(x.dequantized(), self.dequantized(x.dtype))
            y = torch._scaled_mm(x.data.reshape(-1, x.shape[-1]), self.weight.t(), scale_a=x.scale,
                                 scale_b=self.weight_scale, out_dtype=x.dtype)
            return y.reshape(*x.shape[:-1], self.out_features)
        if not (self.use_scaled_mm and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
            return F.linear(x, self.dequantized(x.dtype))
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        a_scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_(min=1e-12)
        xq = (x2.float() / a_scale).to(FP8)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=a_scale, scale_b=self.weight_scale, out_dtype=x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3 per-row scales"


def quantize_fp8(module: nn.Module, names: Sequence[str] = ("qkv", "out", "w1", "w2", "w3")) -> int:
    """Replace bias-free Linear children called `names` (anywhere below `module`) by Fp8Linear.
    Returns the number replaced. Small and precision-sensitive layers (embedders, modulation,
    final layer) stay in their dtype."""
    count = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in names and isinstance(child, nn.Linear) and child.bias is None:
                setattr(parent, child_name, Fp8Linear(child.weight))
                count += 1
    return count
