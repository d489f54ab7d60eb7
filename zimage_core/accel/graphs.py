"""Whole-forward CUDA graphs for the transformer's eager path (`ZImageTransformer.use_cuda_graphs`).

A denoising step at a fixed shape launches the same ~600 kernels every time; replaying them as one CUDA graph
takes the host (Python, kernel launches, ComfyUI's per-step work) out of the GPU's way. The forward is the
plain one: the graph records exactly the kernels an eager call runs, so its output equals the eager output.

How a shape gets a graph: its first call runs eagerly (Triton kernels compile, the sequence layout is built);
the second call runs on a side stream and is then captured; later calls copy their inputs into the graph's
static buffers and replay it. A graph is used only when nothing in the forward can differ between calls
except tensor values:

- no hooks, no compiled block call, no `around` context (ControlNet patches, torch.compile, prefetching),
  no Omni references, no installed attention backend (ComfyUI's attention override);
- every parameter and buffer on the input's CUDA device and no ComfyUI per-call weight casting (lowvram,
  on-the-fly LoRA, manual cast): such weights are copied or patched by Python code during the call;
- no autograd.

Anything else runs eagerly, as before. When a parameter is replaced or moved (a LoRA patched by ComfyUI,
weights offloaded and loaded back) the graphs are dropped and captured again: they read weights by address.
In-place weight updates need nothing (the graph reads the new values). A capture failure leaves that shape
eager for good, with one warning. At most `max_graphs` shapes are kept (each holds its activations' memory);
`clear()` frees them all (the nodes do after each sampling run).
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# ZIMAGE_CUDA_GRAPHS in the environment, for the nodes (zimage_core callers opt in themselves): unset or 0 = off
# (opt-in until the graphs have been checked on a GPU: bench.py's `graphs` stage); "keep" = on, and each model's
# graphs kept between sampling runs (no capture per run, but their activation memory stays allocated while the
# model is idle, unseen by ComfyUI's memory planning); anything else = on, freed after each run.
_MODE = os.environ.get("ZIMAGE_CUDA_GRAPHS", "0").strip().lower()
ENABLED = _MODE not in ("0", "false", "off", "no")
KEEP = _MODE == "keep"


def _weights_key(model: nn.Module) -> tuple:
    """Addresses and devices of every parameter and buffer, and the switches that change the forward's
    kernels: what a captured graph depends on besides its inputs."""
    from . import kernels

    ptrs = tuple(t.data_ptr() for t in model.parameters()) + tuple(t.data_ptr() for t in model.buffers())
    flags = tuple((getattr(b, "fused_kernels", None), getattr(getattr(b, "attention", None), "fp8_attention", None))
                  for b in model.blocks())
    return ptrs, flags, kernels.ENABLED


def why_not(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why this model's forward cannot be captured now, for an input that may be (None when it can)."""
    from ..transformer.attention import installed

    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in model.parameters())):
        return "autograd"
    if torch.compiler.is_compiling():
        return "inside torch.compile"
    if installed() is not None:
        return "an attention backend is installed (ComfyUI attention override)"
    if getattr(model, "streamer", None) is not None or getattr(model, "_compiled_blocks", None):
        return "streamed or compiled blocks"
    for m in model.modules():
        if getattr(m, "comfy_cast_weights", False) or getattr(m, "weight_function", None) or \
                getattr(m, "bias_function", None):
            return "weights cast or patched per call (ComfyUI lowvram / manual cast / on-the-fly LoRA)"
    for t in (*model.parameters(), *model.buffers()):
        if t.device != x.device:
            return f"weights on {t.device} (offloaded)"
    return None


class CudaCapture:
    """Records a forward as a CUDA graph (the default `StepGraphs` capture; tests put an emulation in its place)."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, Any] = {}

    def supports(self, x: torch.Tensor) -> bool:
        return x.is_cuda

    def capture(self, thunk: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, Any, Any]:
        """Runs `thunk` once eagerly on a side stream (its result is returned), then records it.
        Returns (eager result, replay function, the graph's output tensor); raises if the capture fails."""
        current = torch.cuda.current_stream(device)
        # One capture stream per device, kept: the caching allocator reuses its blocks at the next capture.
        side = self._streams.get(device)
        if side is None:
            side = self._streams[device] = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = thunk()  # this call's result, computed eagerly on the capture stream
        out.record_stream(current)  # used (and freed) on the caller's stream
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                static_out = thunk()
        finally:
            current.wait_stream(side)
        return out, graph.replay, static_out


@dataclass
class _Graph:
    x: torch.Tensor
    sigma: torch.Tensor
    caps: list[torch.Tensor]
    replay: Any = None
    out: torch.Tensor | None = None
    keep: list[Any] = field(default_factory=list)  # what the graph reads by address (layouts' RoPE, masks)


class StepGraphs:
    """CUDA graphs of a transformer's whole forward, one per input shape (see the module docstring)."""

    def __init__(self, max_graphs: int = 2, capture: Any = None) -> None:
        self.max_graphs = max(1, int(max_graphs))
        self.capturer = capture or CudaCapture()
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._seen: set[tuple] = set()
        self._failed: set[tuple] = set()
        self._weights: tuple | None = None
        self._said: set[str] = set()
        self.replays = 0
        self.captures = 0

    def clear(self) -> None:
        """Drop every graph (frees their memory); shapes seen so far capture again on their next call."""
        self._graphs.clear()
        self._seen.clear()
        self._weights = None

    def __len__(self) -> int:
        return len(self._graphs)

    def _say(self, msg: str, *args: Any) -> None:
        if msg not in self._said:  # once per reason, not once per step
            self._said.add(msg)
            log.info("Z-Image CUDA graphs: " + msg, *args)

    def run(self, model: nn.Module, x: torch.Tensor, sigma: Any, cap_feats: Any,
            image_pos: tuple[float, float, float, float],
            forward: Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor]], torch.Tensor]) -> torch.Tensor | None:
        """The forward of (x, sigma, cap_feats) through a graph, or None when the caller must run it eagerly.
        `forward(x, sigma, caps)` is the plain forward on already checked inputs."""
        reason = "not on CUDA" if not self.capturer.supports(x) else why_not(model, x)
        if reason is not None:
            self._say("not used (%s); the step runs eagerly.", reason)
            return None
        b = x.shape[0]
        sig = torch.as_tensor(sigma)
        if not sig.is_floating_point() or sig.is_complex() or sig.numel() not in (1, b):
            return None  # the eager forward explains the error
        caps = model._check_captions(cap_feats, b)
        sig = sig.reshape(-1).to(device=x.device, dtype=torch.float32).expand(b)
        key = (tuple(x.shape), x.dtype, x.stride(), x.device, tuple((tuple(c.shape), c.dtype, c.device) for c in caps),
               tuple(image_pos), model._compute_dtype())
        if key in self._failed:
            return None
        weights = _weights_key(model)
        if weights != self._weights:
            if self._graphs:
                log.info("Z-Image CUDA graphs: the weights or kernel settings changed (LoRA, reload, fp8); "
                         "dropping %d graph(s), the next steps capture again.", len(self._graphs))
            self.clear()
            self._weights = weights
        g = self._graphs.get(key)
        if g is not None:
            self._graphs.move_to_end(key)
            g.x.copy_(x)
            g.sigma.copy_(sig)
            for s, c in zip(g.caps, caps, strict=True):
                s.copy_(c)
            g.replay()
            self.replays += 1
            return g.out.clone()
        if key not in self._seen:
            self._seen.add(key)  # first call at this shape: eager (compiles kernels, builds the layout)
            return None
        return self._capture(model, key, x, sig, caps, forward)

    def _capture(self, model: nn.Module, key: tuple, x: torch.Tensor, sig: torch.Tensor, caps: list[torch.Tensor],
                 forward: Callable[..., torch.Tensor]) -> torch.Tensor:
        g = _Graph(x.clone(), sig.clone(), [c.clone() for c in caps])
        t0 = time.perf_counter()
        try:
            out, g.replay, g.out = self.capturer.capture(lambda: forward(g.x, g.sigma, g.caps), x.device)
        except Exception as exc:  # noqa: BLE001 - any capture problem: this shape stays eager
            self._failed.add(key)
            log.warning("Z-Image CUDA graphs: capture failed at %s (%s: %s); that shape runs eagerly.",
                        tuple(x.shape), type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            return None
        g.keep = list(getattr(model, "_layouts", {}).values())
        self._graphs[key] = g
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        log.info("Z-Image CUDA graphs: captured the transformer step for latents %s, caption tokens %s "
                 "(%.0f ms); later steps at this shape replay it.", tuple(x.shape),
                 [int(c.shape[0]) for c in caps], (time.perf_counter() - t0) * 1e3)
        return out


def plain_runner(runner: Any) -> bool:
    """A runner that adds nothing to the forward (None, or a BlockRunner without hooks, block call or context)."""
    from ..transformer.runner import BlockRunner, call_block

    return runner is None or (type(runner) is BlockRunner and runner.hooks is None and runner.around is None
                              and runner.block_call is call_block)
