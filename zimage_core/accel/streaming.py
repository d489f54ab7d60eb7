"""Weight streaming: keep some blocks of a ModuleList resident and stream the others from pinned CPU
memory, one block ahead on a side stream (for cards that cannot hold the weights)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .prefetch import WeightPrefetcher


class BlockStreamer(WeightPrefetcher):
    """Keep the first `resident` blocks on `device` and stream the rest from pinned CPU memory.

    Streamed blocks share two GPU slots: while block j runs, block j+1's weights copy into the
    other slot on a side stream (PCIe overlapped with compute). With `wrap=True` (repeated calls,
    e.g. sampling steps) the last block prefetches the first one for the next call; `release()`
    frees the slots until the next call (e.g. a text encoder between prompts). Parameters of
    streamed blocks point at pinned CPU memory between calls: call `remove()` before moving the
    model yourself.
    """

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device | str, *, resident: int = 0,
                 wrap: bool = True) -> None:
        device = torch.device(device)
        blocks = list(blocks)
        self.resident = max(0, min(int(resident), len(blocks)))
        for b in blocks[: self.resident]:
            b.to(device)
        pin = device.type == "cuda"
        for b in blocks[self.resident:]:
            for t in [*b.parameters(), *b.buffers()]:
                if not (t.data.device.type == "cpu" and (t.data.is_pinned() or not pin)):
                    t.data = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin).copy_(t.data)
        super().__init__(blocks[self.resident:], device, select=lambda t: True, ahead=1, wrap=wrap)

    def remove(self, device: torch.device | str | None = None) -> None:  # type: ignore[override]
        """Undo streaming: drop the hooks and put every streamed block on `device` (default: the GPU)."""
        super().remove()
        target = torch.device(device) if device is not None else self.device
        for ts in self.tensors:
            for t in ts:
                t.data = t.data.to(target)
