"""Manual-cast layers for the text encoder without a host: weights stay in their stored dtype and each
layer computes in its input's dtype (a cast copy of its weight per call, freed after it), as ComfyUI's
`comfy.ops.manual_cast` does. `load_text_encoder(..., compute_dtype=torch.float32)` on a bf16 file uses
them when no `operations` are given, so zimage_core computes what ComfyUI's CLIP computes on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CastLinear(nn.Linear):
    """nn.Linear computing in its input's dtype and on its input's device, whatever its weight's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w.dtype != x.dtype or w.device != x.device:
            w = w.to(device=x.device, dtype=x.dtype)
            b = None if b is None else b.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, b)


class manual_cast:  # noqa: N801 - named like the ComfyUI namespace it stands in for
    """An `operations` namespace (see `load_text_encoder`): Linear casts per call. The embedding is a plain
    lookup (exact in any dtype; the encoder casts its rows to the compute dtype)."""

    Linear = CastLinear
