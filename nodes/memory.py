"""The memory and offload policy of our MODEL inside ComfyUI: its memory estimate, how a transformer that
does not fit is partly loaded, and the prefetch of the weights left in host memory.

On a card that cannot hold the whole transformer, ComfyUI loads as much of it as the estimate leaves room
for, and copies each offloaded layer's weights to the GPU when the layer runs. This module keeps that
machinery ComfyUI's, and only orders, budgets and prefetches it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import comfy.model_base
import torch

from ..zimage_core.accel import prefetch_offloaded
from ..zimage_core.vae import decode_room
from .comfy_compat import core_patcher_class, is_dynamic_layer, is_dynamic_load_list

log = logging.getLogger("ComfyUI-ZImage")


class ZImageBaseModel(comfy.model_base.Lumina2):
    """ComfyUI's model class for Z-Image (model_base.Lumina2), whose memory estimate also covers the VAE
    decode that follows sampling.

    Without the decode in it, the decode unloads part of a partly loaded transformer, and the next prompt
    loads it again (1.4-1.7 s per image at 8 and 12 GiB on an H200)."""

    def memory_required(self, input_shape, *args, **kwargs):
        need = super().memory_required(input_shape, *args, **kwargs)
        dtype = self.manual_cast_dtype or self.get_dtype()
        return max(need, decode_room(input_shape, dtype))


def prefetch_context(blocks: list[torch.nn.Module], device: torch.device) -> contextlib.AbstractContextManager | None:
    """When ComfyUI's partial loading left block weights in host memory, copy them to the GPU blocks ahead
    (a context for the forward's block runner). ComfyUI's own cast copies each layer's weights when the layer
    runs, after everything queued before it, so no copy overlaps compute. None where there is nothing to do,
    and under dynamic VRAM, whose layers manage their own copies."""
    if device.type != "cuda" or any(is_dynamic_layer(m) for b in blocks for m in b.modules()):
        return None
    return prefetch_offloaded(blocks, device, select=lambda t: t.device.type == "cpu")


def _spread_offload(loading: list[tuple], blocks: list[torch.nn.Module]) -> list[tuple]:
    """ComfyUI's `_load_list`, with equal-size block layers ordered so that those it leaves in host memory
    (the last in its descending order) are one kind at a time across all blocks (e.g. every block's w1)
    rather than all layers of a few blocks: each block then waits for a share of the copies that the
    compute of the blocks before it hides. The sort key grows by under 1 KiB: the memory plan is unchanged."""
    if not loading or is_dynamic_load_list(loading):
        return loading
    kinds: dict[str, int] = {}
    rank: dict[int, tuple[str, int]] = {}
    for i, b in enumerate(blocks):
        for name, m in b.named_modules():
            if hasattr(m, "comfy_cast_weights"):
                rank[id(m)] = (name, i)
                kinds.setdefault(name, len(kinds))
    n = len(blocks)
    out = []
    for item in loading:
        key = rank.get(id(item[3]))
        if key is not None:
            item = (item[0] + kinds[key[0]] * n + key[1], *item[1:])
        out.append(item)
    return out


class _PartialLoading:
    """Patcher mixin for a transformer that does not fit on the card (ComfyUI's partial loading). Clones keep
    the class (ModelPatcher.clone uses self.__class__); the dynamic-VRAM patcher is left as it is.

    - The layers left in host memory are spread over the blocks (see _spread_offload).
    - Loading the partly loaded model again (every prompt) with `extra_memory` more loads that much more.
      ComfyUI's `load` takes its cast buffer out of the budget again, so it would load `extra_memory − buffer`
      more; when that is negative it marks layers that were loaded as offloaded without moving them: they
      stay on the GPU, uncounted, and every later prompt finds that much less free memory (measured: 140 MB
      less per prompt at 12 GiB)."""

    def _load_list(self, *args, **kwargs):
        loading = super()._load_list(*args, **kwargs)
        blocks = getattr(getattr(self.model, "diffusion_model", None), "blocks", None)
        if not callable(blocks) or not hasattr(self.model.diffusion_model, "prefetch_offloaded"):
            return loading
        return _spread_offload(loading, blocks())

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        m = self.model
        buffer = getattr(m, "model_offload_buffer_memory", 0)
        if (extra_memory >= 0 and getattr(m, "model_lowvram", False) and not force_patch_weights
                and m.current_weight_patches_uuid == self.patches_uuid
                and m.model_loaded_weight_memory + extra_memory + buffer < self.model_size()):
            extra_memory += buffer + 1  # the buffer is reserved already; +1: `load` tests with a strict <
        return super().partially_load(device_to, extra_memory, force_patch_weights=force_patch_weights)


_PATCHERS: dict[tuple, type] = {}


def patcher_class(base: type | None = None, mixins: tuple[type, ...] = ()) -> type:
    """Our patcher: ComfyUI's current core patcher class (or `base`) with the partial-loading policy above and
    `mixins` (e.g. GGUF's run-time LoRA patches)."""
    base = base or core_patcher_class()
    if (base, mixins) not in _PATCHERS:
        _PATCHERS[(base, mixins)] = type("ZImageModelPatcher", (*mixins, _PartialLoading, base), {})
    return _PATCHERS[(base, mixins)]


def make_patcher(model: Any, load_device: torch.device, offload_device: torch.device, base: type | None = None,
                 mixins: tuple[type, ...] = ()) -> Any:
    return patcher_class(base, mixins)(model, load_device=load_device, offload_device=offload_device)
