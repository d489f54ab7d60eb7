"""Checked tensors -> a model's parameters: read (dequantized, several stored tensors joined on dim 0),
cast, owned, and set in place of a meta parameter. Shared by every component's loader."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

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


@runtime_checkable
class LayerLoader(Protocol):
    """Layers that read their own (possibly quantized) tensors, e.g. ComfyUI's mixed-precision Linear: the
    loader hands each layer it `handles` the tensors the file stores for it, as stored (quantized weights
    are not dequantized), instead of setting its parameters itself.

    `formats`: quantization formats (ComfyUI's comfy_quant names, e.g. "float8_e4m3fn", "nvfp4") whose
    weights these layers read; a file's weights in other non-float formats are refused as before.
    `load(module, name, tensors, quant, device)`: `tensors` maps parameter and side-tensor names ("weight",
    "bias", "weight_scale", "input_scale", ...) to tensors on `device` owned by the caller (never the
    file's memory); `quant` is the layer's quantization config from the file (None: not quantized). It
    raises ValueError for tensors it cannot use."""

    formats: frozenset[str]

    def handles(self, module: nn.Module) -> bool: ...

    def load(self, module: nn.Module, name: str, tensors: dict[str, torch.Tensor], quant: dict | None,
             device: torch.device | str) -> None: ...
