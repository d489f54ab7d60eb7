"""Checked tensors -> a model's parameters: read (dequantized, several stored tensors joined on dim 0),
cast, owned, and set in place of a meta parameter. Shared by every component's loader."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .dequant import dequantize
from .io import Checkpoint


def read_joined(ckpt: Checkpoint, sources: tuple[str, ...], stored: Mapping[str, torch.dtype],
                device: torch.device | str) -> torch.Tensor:
    """One parameter's value from its stored tensors (e.g. split q/k/v joined into a fused qkv), each
    dequantized from the dtype `stored_dtype` accepted. May still be the file's memory: see `set_param`."""
    parts = [dequantize(ckpt, src, stored[src], device) for src in sources]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def set_param(ckpt: Checkpoint, module: nn.Module, name: str, value: torch.Tensor, *,
              dtype: torch.dtype, device: torch.device | str) -> None:
    """`module`'s parameter `name` (a dotted path) becomes `value` in `dtype` on `device`, owned by the model
    (never the file's memory, which a rewrite of the file would change)."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    owner._parameters[attr] = nn.Parameter(ckpt.owned(value.to(device=device, dtype=dtype)), requires_grad=False)
