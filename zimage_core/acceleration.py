"""Speed and memory options for the Z-Image transformer and text encoder on GPUs.

Everything here is opt-in and keeps the model's function (bf16 rounding aside):
- `compile_blocks`: regional torch.compile - one transformer block is compiled and the graph is
  reused by every block of the same kind, so warm-up costs one block, not 30. Falls back to eager
  (with a warning) if the compiler is missing or fails.
- `quantize_fp8`: float8_e4m3fn weights with per-row scales for the block matmuls (Hopper/Ada fp8
  tensor cores through `torch._scaled_mm`, per-token activation scales); elsewhere the weights are
  dequantized on the fly, so the same model still runs.
- `BlockStreamer`: keep some blocks of a ModuleList resident and stream the others' weights from
  pinned CPU memory, one block ahead on a side stream (for cards that cannot hold the weights).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


# ---------------------------------------------------------------------------------------------
# regional compilation
# ---------------------------------------------------------------------------------------------

def _dynamo() -> Any | None:
    """torch._dynamo with its recompile limits raised (every (block kind, sequence length) is one
    cache entry; allow several resolutions), or None when the compiler is unavailable."""
    try:
        import torch._dynamo as dynamo
    except Exception:  # noqa: BLE001 - any import problem means: stay eager
        log.warning("torch.compile is unavailable; the transformer runs eagerly.")
        return None
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
    if hasattr(dynamo.config, "accumulated_cache_size_limit"):
        dynamo.config.accumulated_cache_size_limit = max(dynamo.config.accumulated_cache_size_limit, 512)
    return dynamo


def compile_blocks(blocks: Sequence[nn.Module], *, mode: str | None = None, dynamic: bool = False) -> bool:
    """Compile each block's forward in place (`nn.Module.compile`). Blocks of one class share the
    compiled code because dynamo treats their parameters as inputs, so the cost is one block per
    distinct (kind, shape). Returns False (and leaves the blocks eager) if torch.compile is missing.
    """
    if _dynamo() is None:
        return False
    for block in blocks:
        if "forward" not in block.__dict__:
            # Compile forward (not __call__) so hooks, e.g. BlockStreamer's, stay eager.
            block.forward = torch.compile(block.forward, mode=mode, dynamic=dynamic)
    return True


class CompiledBlockCall:
    """A `BlockCall` (see transformer.py) that runs each block's forward through torch.compile.

    The compiled functions live here, not on the model: one model can serve a compiled and an eager
    caller at once (ComfyUI branches that share weights). Same sharing of compiled code between blocks
    as `compile_blocks`. After a compiler failure (`is_compile_failure`), call `disable()` and retry:
    every later call runs eagerly.
    """

    def __init__(self, mode: str | None = None) -> None:
        self.mode = mode
        self.enabled = _dynamo() is not None
        self._fns: dict[int, Any] = {}

    def disable(self) -> None:
        self.enabled = False
        self._fns.clear()

    def __call__(self, block: nn.Module, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                 c: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return block(x, rope, mask, c)
        fn = self._fns.get(id(block))
        if fn is None:
            fn = self._fns[id(block)] = torch.compile(block.forward, mode=self.mode)
        return fn(x, rope, mask, c)


def uncompile_blocks(blocks: Sequence[nn.Module]) -> None:
    for block in blocks:
        block.__dict__.pop("forward", None)


def is_compile_failure(exc: BaseException) -> bool:
    """True for errors raised by the compiler stack (not by the model's own checks)."""
    mod = type(exc).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor", "triton")) or "BackendCompilerFailed" in type(exc).__name__


# ---------------------------------------------------------------------------------------------
# fp8 weights
# ---------------------------------------------------------------------------------------------

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------------
# weight streaming
# ---------------------------------------------------------------------------------------------

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
