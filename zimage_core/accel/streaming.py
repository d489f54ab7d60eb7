"""Weight streaming: keep some blocks of a ModuleList resident and stream the others from pinned CPU
memory, one block ahead on a side stream (for cards that cannot hold the weights)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


class BlockStreamer:
    """Keep the first `resident` blocks on `device` and stream the rest from pinned CPU memory.

    Streamed blocks share two GPU slots: while block j runs, block j+1's weights copy into the
    other slot on a side stream (PCIe overlapped with compute). Blocks must run in order, as in a
    transformer's loop. With `wrap=True` (repeated calls, e.g. sampling steps) the last blocks
    prefetch the first ones for the next call; `release()` frees the slots until the next call
    (e.g. a text encoder between prompts). Parameters of streamed blocks point at pinned CPU
    memory between calls: call `remove()` before moving the model yourself.
    """

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device | str, *, resident: int = 0,
                 wrap: bool = True) -> None:
        self.device = torch.device(device)
        self.blocks = list(blocks)
        self.resident = max(0, min(int(resident), len(self.blocks)))
        self.wrap = wrap
        if wrap and (len(self.blocks) - self.resident) % 2 and len(self.blocks) - self.resident > 1:
            self.resident += 1  # an even count keeps the two slots' round robin valid across calls
        self.streamed = self.blocks[self.resident:]
        for b in self.blocks[: self.resident]:
            b.to(self.device)
        self.cpu: list[list[torch.Tensor]] = []
        self.params: list[list[torch.Tensor]] = []
        pin = self.device.type == "cuda"
        for b in self.streamed:
            ps = list(b.parameters()) + list(b.buffers())
            host = []
            for p in ps:
                h = p.data if (p.data.device.type == "cpu" and (p.data.is_pinned() or not pin)) else \
                    torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin).copy_(p.data)
                p.data = h
                host.append(h)
            self.cpu.append(host)
            self.params.append(ps)
        if self.streamed:
            ref = [t.shape for t in self.cpu[0]]
            if any([t.shape for t in other] != ref for other in self.cpu[1:]):
                raise ValueError("BlockStreamer: streamed blocks must have identical parameter shapes.")
        self.n_slots = min(2, len(self.streamed))
        self.slots: list[list[torch.Tensor]] = []
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.loaded: list[Any] = [None] * len(self.streamed)
        self.slot_free: list[Any] = [None] * self.n_slots
        self.handles = []
        for j, b in enumerate(self.streamed):
            self.handles.append(b.register_forward_pre_hook(self._make_pre(j)))
            self.handles.append(b.register_forward_hook(self._make_post(j)))

    @property
    def streamed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for host in self.cpu for t in host)

    def _prefetch(self, j: int) -> None:
        fresh = not self.slots
        if fresh:
            self.slots = [[torch.empty_like(t, device=self.device) for t in self.cpu[0]]
                          for _ in range(self.n_slots)]
        slot = j % self.n_slots
        if self.copy_stream is None:
            for dst, src in zip(self.slots[slot], self.cpu[j], strict=True):
                dst.copy_(src)
            self.loaded[j] = True
            return
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            if fresh:
                # The allocator may hand out memory that queued compute kernels still read (it is
                # stream-ordered for the compute stream only): copy only after that work.
                self.copy_stream.wait_stream(compute)
            if self.slot_free[slot] is not None:
                self.copy_stream.wait_event(self.slot_free[slot])
            for dst, src in zip(self.slots[slot], self.cpu[j], strict=True):
                dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        self.loaded[j] = ev

    def _make_pre(self, j: int):
        def hook(module: nn.Module, args: Any) -> None:
            if self.loaded[j] is None:
                self._prefetch(j)
            if j + 1 < len(self.streamed) and self.loaded[j + 1] is None:
                self._prefetch(j + 1)  # into the other slot, once block j-1 has released it
            if self.copy_stream is not None:
                torch.cuda.current_stream(self.device).wait_event(self.loaded[j])
            for p, dst in zip(self.params[j], self.slots[j % self.n_slots], strict=True):
                p.data = dst
        return hook

    def _make_post(self, j: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            for p, host in zip(self.params[j], self.cpu[j], strict=True):
                p.data = host
            self.loaded[j] = None
            if self.copy_stream is not None:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                self.slot_free[j % self.n_slots] = ev
            # The next call's first blocks load while the rest of this call finishes.
            nxt = j + self.n_slots
            if self.wrap and nxt >= len(self.streamed) and self.loaded[nxt % len(self.streamed)] is None:
                self._prefetch(nxt % len(self.streamed))
        return hook

    def release(self) -> None:
        """Free the GPU slots; the next forward allocates and fills them again."""
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        self.slots = []
        self.loaded = [None] * len(self.streamed)
        self.slot_free = [None] * self.n_slots

    def remove(self, device: torch.device | str | None = None) -> None:
        """Undo streaming: drop the hooks and put every streamed block on `device` (default: the GPU)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        self.release()
        target = torch.device(device) if device is not None else self.device
        for ps, host in zip(self.params, self.cpu, strict=True):
            for p, h in zip(ps, host, strict=True):
                p.data = h.to(target)
