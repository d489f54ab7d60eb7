"""Weight streaming: keep some blocks of a ModuleList resident and stream the others from pinned CPU
memory, one block ahead on a side stream (for cards that cannot hold the weights)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

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


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory()


class HostPinner:
    """Page-locks a module's CPU weights in a background thread.

    Streaming copies from pinned memory only; pinning a 7.3 GiB text encoder takes seconds, and done inside the
    first streamed encode it made that prompt several times slower than the next ones. Started when the weights
    land on the CPU (after loading, after an offload), it overlaps with whatever runs meanwhile. Callers that
    touch the weights call `wait()` first: only this thread replaces `.data` while it runs. A failure to pin
    (hosts short of page-locked memory) leaves the remaining tensors as they were; streaming then pins or
    falls back as before.
    """

    def __init__(self, module: nn.Module, *, pin: Callable[[torch.Tensor], torch.Tensor] = _pinned_copy) -> None:
        self._module = module
        self._pin = pin
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _targets(self) -> list[torch.Tensor]:
        return [t for t in [*self._module.parameters(), *self._module.buffers()]
                if t.data.device.type == "cpu" and not t.data.is_pinned()]

    def start(self) -> bool:
        """Pin in the background; False when nothing is left to pin (or a run is still going)."""
        if self._thread is not None and self._thread.is_alive():
            return False
        targets = self._targets()
        if not targets:
            return False
        self.error = None
        self._thread = threading.Thread(target=self._run, args=(targets,), name="zimage-host-pinner", daemon=True)
        self._thread.start()
        return True

    def _run(self, targets: list[torch.Tensor]) -> None:
        try:
            for t in targets:
                if t.data.device.type != "cpu" or t.data.is_pinned():
                    continue
                t.data = self._pin(t.data)
        except BaseException as exc:  # noqa: BLE001 - reported through `error`; the weights stay usable
            self.error = exc

    def wait(self) -> None:
        """Block until a running pin has finished (weights are safe to move or read afterwards)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
