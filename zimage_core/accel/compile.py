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
from torch import nn

from ..transformer.runner import BlockCall, BlockHooks, BlockRunner, call_block
from .compile_cache import CompileCache

log = logging.getLogger(__name__)


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

    With a `cache` (CompileCache), saved artifacts are loaded before the first compile, and the
    transformer's `forward_done()` call saves them after a forward that met a new shape.
    """

    def __init__(self, mode: str | None = None, cache: CompileCache | None = None) -> None:
        self.mode = mode
        self.enabled = _dynamo() is not None
        self.cache = cache
        self._fns: dict[int, Any] = {}
        self._loaded = False

    def disable(self) -> None:
        self.enabled = False
        self._fns.clear()

    def __call__(self, block: nn.Module, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                 c: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return block(x, rope, mask, c)
        if self.cache is not None:
            if not self._loaded:
                self._loaded = True
                self.cache.load()
            self.cache.note((type(block).__name__, tuple(x.shape), x.dtype, mask is None, self.mode))
        fn = self._fns.get(id(block))
        if fn is None:
            fn = self._fns[id(block)] = torch.compile(block.forward, mode=self.mode)
        return fn(x, rope, mask, c)

    def forward_done(self) -> None:
        """Called by the transformer after a successful forward: persist newly compiled artifacts."""
        if self.enabled and self.cache is not None:
            self.cache.save_if_new()


def uncompile_blocks(blocks: Sequence[nn.Module]) -> None:
    for block in blocks:
        block.__dict__.pop("forward", None)


def is_compile_failure(exc: BaseException) -> bool:
    """True for errors raised by the compiler stack (not by the model's own checks)."""
    mod = type(exc).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor", "triton")) or "BackendCompilerFailed" in type(exc).__name__


class CompileFallback(BlockRunner):
    """The BlockRunner of a transformer with compiled blocks (`compile_blocks`) or a compiled `block_call`.

    After a compiler failure (`is_compile_failure`) it uncompiles the blocks, disables the block call and
    runs the forward again eagerly (every later call stays eager); after a forward it saves newly compiled
    artifacts (the block call's `forward_done`, the model's CompileCache)."""

    def __init__(self, model: nn.Module, block_call: BlockCall | None, hooks: BlockHooks | None,
                 around: Any = None) -> None:
        super().__init__(block_call, hooks, around)
        self.model = model
        self._shape: tuple = ()

    def main(self, blocks, seq, layout, mod, x):  # noqa: ANN001, ANN201 - BlockRunner.main
        self._shape = (tuple(seq.shape), seq.dtype, layout.joint.mask is None)
        return super().main(blocks, seq, layout, mod, x)

    def execute(self, step):  # noqa: ANN001, ANN201 - BlockRunner.execute
        model = self.model
        try:
            out = self.run(step)
        except Exception as exc:
            if not is_compile_failure(exc):
                raise
            log.warning("torch.compile failed (%s: %s); running the Z-Image transformer eagerly.",
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            uncompile_blocks(model._compiled_blocks)
            model._compiled_blocks = []
            disable = getattr(self.block_call, "disable", None)
            if disable is not None:
                disable()  # its later calls run eagerly too
            self.block_call = call_block
            return self.run(step)
        done = getattr(self.block_call, "forward_done", None)
        if done is not None:
            done()
        if model._compiled_blocks and model._compile_cache is not None:
            model._compile_cache.note(self._shape)
            model._compile_cache.save_if_new()
        return out
