"""Prefetching of host-resident weights: run blocks whose weights (some or all of them) live in CPU memory
with GPU copies that were started on a side stream while earlier blocks computed.

This is the one engine behind weight streaming: `BlockStreamer` (our own low-VRAM mode: whole blocks in
pinned memory) and the ComfyUI adapter (the modules ComfyUI's partial loading leaves in host memory). A copy
that is started only when its layer runs, as ComfyUI's per-layer cast does, waits for everything queued
before it; started blocks ahead, it overlaps their compute.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_ALIGN = 512  # bytes; every tensor view in a slot starts on this boundary (any dtype's alignment)


def _tensors(block: nn.Module) -> list[torch.Tensor]:
    # Plain tensors only: a tensor subclass (e.g. ComfyUI's QuantizedTensor, fp8 bytes plus scales) is not
    # its bytes in one view of a slot; its layer copies it when it runs, as without prefetch.
    return [t for t in (*block.parameters(), *block.buffers()) if type(t) in (torch.Tensor, nn.Parameter)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class WeightPrefetcher:
    """Give each block GPU copies of its host-resident tensors while it runs, copied `ahead` blocks early.

    `select(tensor)` picks the tensors to copy (default: those not on `device`); blocks without any are
    left alone. The tensors' `.data` points at the GPU copy from the block's forward pre-hook to its
    forward hook and at the host tensor otherwise, so the module is never changed outside a call. Copies
    go into `ahead + 1` reusable GPU slots on a side stream; a slot is overwritten only after the block
    that used it has finished on the compute stream. Blocks may run in any order (a block whose copy is
    not ready is copied on demand); in call order, each copy overlaps the compute of the blocks before.
    With `wrap=True` (repeated calls, e.g. sampling steps) the last blocks start the copies of the first
    ones for the next call. Host tensors should be pinned for the copies to be asynchronous.
    """

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device | str, *,
                 select: Callable[[torch.Tensor], bool] | None = None, ahead: int = 1, wrap: bool = False) -> None:
        self.device = torch.device(device)
        chosen = select or (lambda t: t.device != self.device)
        self.blocks: list[nn.Module] = []
        self.tensors: list[list[torch.Tensor]] = []
        self.host: list[list[torch.Tensor]] = []
        self.offsets: list[list[int]] = []
        slot_bytes = 0
        for b in blocks:
            ts = [t for t in _tensors(b) if chosen(t)]
            if not ts:
                continue
            offsets, end = [], 0
            for t in ts:
                offsets.append(end)
                end += -(-_nbytes(t) // _ALIGN) * _ALIGN
            slot_bytes = max(slot_bytes, end)
            self.blocks.append(b)
            self.tensors.append(ts)
            self.host.append([t.data for t in ts])
            self.offsets.append(offsets)
        self.slot_bytes = slot_bytes
        self.wrap = wrap
        n = len(self.blocks)
        self.ahead = max(0, min(int(ahead), n - 1))
        self.n_slots = min(self.ahead + 1, n)
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and n else None
        self.slots: list[torch.Tensor] = []
        self.next_slot = 0
        self.owner: list[int | None] = []  # block index whose copy a slot holds (or is receiving)
        self.slot_of: list[int | None] = [None] * n
        self.ready: list[Any] = [None] * n  # copy-done event per block (True without CUDA)
        self.slot_free: list[Any] = []  # per slot: compute-stream event after its last user ran
        self.handles: list[Any] = []
        for j, b in enumerate(self.blocks):
            self.handles.append(b.register_forward_pre_hook(self._make_pre(j)))
            self.handles.append(b.register_forward_hook(self._make_post(j)))

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied per full pass over the blocks."""
        return sum(_nbytes(h) for host in self.host for h in host)

    def __len__(self) -> int:
        return len(self.blocks)

    def _alloc(self) -> None:
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
                      for _ in range(self.n_slots)]
        self.owner = [None] * self.n_slots
        self.slot_free = [None] * self.n_slots
        self.next_slot = 0
        if self.copy_stream is not None:
            # The allocator is stream-ordered for the compute stream only: the new slots may be memory that
            # queued compute kernels still read, so the first copies wait for that work.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))

    def _views(self, j: int, slot: int) -> list[torch.Tensor]:
        buf = self.slots[slot]
        return [buf[o:o + _nbytes(h)].view(h.dtype).view(h.shape)
                for o, h in zip(self.offsets[j], self.host[j], strict=True)]

    def _prefetch(self, j: int) -> None:
        if not self.slots:
            self._alloc()
        slot = self.next_slot
        self.next_slot = (slot + 1) % self.n_slots
        old = self.owner[slot]
        if old is not None and old != j:
            self.slot_of[old] = None  # evicted before it ran (out-of-order calls): copied again on demand
            self.ready[old] = None
        self.owner[slot] = j
        self.slot_of[j] = slot
        dst = self._views(j, slot)
        if self.copy_stream is None:
            for d, h in zip(dst, self.host[j], strict=True):
                d.copy_(h)
            self.ready[j] = True
            return
        with torch.cuda.stream(self.copy_stream):
            if self.slot_free[slot] is not None:
                self.copy_stream.wait_event(self.slot_free[slot])
            for d, h in zip(dst, self.host[j], strict=True):
                d.copy_(h, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        self.ready[j] = ev

    def _make_pre(self, j: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if self.ready[j] is None:
                self._prefetch(j)
            n = len(self.blocks)
            for k in range(j + 1, j + 1 + self.ahead):
                if k >= n and not self.wrap:
                    break
                if self.ready[k % n] is None:
                    self._prefetch(k % n)
            if self.copy_stream is not None:
                torch.cuda.current_stream(self.device).wait_event(self.ready[j])
            for t, v in zip(self.tensors[j], self._views(j, self.slot_of[j]), strict=True):
                t.data = v
        return hook

    def _make_post(self, j: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            for t, h in zip(self.tensors[j], self.host[j], strict=True):
                t.data = h
            slot = self.slot_of[j]
            self.ready[j] = None
            self.slot_of[j] = None
            self.owner[slot] = None
            if self.copy_stream is not None:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                self.slot_free[slot] = ev
        return hook

    def release(self) -> None:
        """Free the GPU slots (the next call allocates and fills them again); every tensor points at its
        host data again, also after a block that raised."""
        for ts, host in zip(self.tensors, self.host, strict=True):
            for t, h in zip(ts, host, strict=True):
                t.data = h
        if self.copy_stream is not None and self.slots:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        self.slots = []
        self.owner = []
        self.slot_free = []
        self.slot_of = [None] * len(self.blocks)
        self.ready = [None] * len(self.blocks)

    def remove(self) -> None:
        """Drop the hooks and the slots; every tensor points at its host data again."""
        for h in self.handles:
            h.remove()
        self.handles = []
        self.release()


@contextmanager
def prefetch_offloaded(blocks: Sequence[nn.Module], device: torch.device | str, *,
                       select: Callable[[torch.Tensor], bool] | None = None,
                       ahead: int = 2) -> Iterator[WeightPrefetcher | None]:
    """For the calls inside the block: blocks with tensors away from `device` (e.g. left in host memory by
    a partial loader) get them prefetched `ahead` blocks early (see WeightPrefetcher). Yields None, and
    changes nothing, when no block has such tensors or the GPU has no room for the copy slots (the
    caller's own per-layer casting then runs as before)."""
    device = torch.device(device)
    if device.type != "cuda":
        yield None
        return
    pf = WeightPrefetcher(blocks, device, select=select, ahead=ahead)
    if not len(pf):
        pf.remove()
        yield None
        return
    try:
        pf._alloc()
    except torch.OutOfMemoryError:
        pf.remove()
        log.info("Weight prefetch: no GPU room for %d × %.0f MiB copy slots; copying per layer instead.",
                 pf.n_slots, pf.slot_bytes / 2**20)
        yield None
        return
    try:
        yield pf
    finally:
        pf.remove()
