"""Ulysses sequence parallelism: one forward's tokens split across the G ranks of a torch.distributed group.

The plan (`ULYSSES_PLAN`, in the spirit of diffusers' `_cp_plan`) declares where the sequence is split and
gathered, so nothing is woven through the model's forward:

- split: at the entry of the runner stages it names (`noise_refine`: the image stream; `main`: the joint
  sequence [images; SigLIP; captions], as `sequence.py` assembles it). The stream is padded to a multiple of
  G × 32 tokens (`sharded_length`) and rank r keeps the r-th contiguous chunk; the stream's RoPE rows and
  Omni's per-token noisy flags are sliced alike, and the key mask becomes the full padded one (pad tokens
  masked), since each rank sees every key after the exchange;
- exchange: around attention only, through the attention seam (`transformer.attention.use_backend`): q/k/v
  (B, L/G, H, D) go heads ↔ sequence by `all_to_all_single` to (B, L, H/G, D), the backend the block would
  have used runs on those heads, and the output goes back the same way. The block math is untouched;
- gather: at the stage's exit (`all_gather`, padding dropped), so the final layer and everything after it see
  the whole sequence; and around each hook (ControlNet, ComfyUI block patches), which the runner contract
  gives the full stream: the hooks run on every rank alike, then the stream is split again.

Z-Image has 30 heads; for G ∤ 30 (4, 8) the heads are padded with zero q/k/v heads to a multiple of G
(cache-dit's approach): a zero head attends uniformly over zero values, its output is dropped after the
exchange. The cost is Hp/H of the attention (32/30 at G = 4 and 8); ring attention (USP) is not used.

Transport: torch.distributed only (NCCL on the GPU, gloo on the CPU). gloo has `all_to_all_single` for CPU
tensors in the torch this project pins (2.13; checked by tests/test_parallel.py, which runs it over gloo).
The caption and context refiners (unmodulated, a few hundred tokens) run whole on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..constants import SEQ_MULTIPLE
from ..transformer.attention import AttentionBackend, backend_for, use_backend
from ..transformer.runner import BlockCall, BlockHooks, BlockRunner, Modulation, Timesteps, TokenTimesteps
from ..transformer.sequence import SequenceLayout, Stream, padded

# Runner stage -> the layout stream it runs over; that stage's blocks run on sequence shards.
ULYSSES_PLAN: dict[str, str] = {"noise_refine": "image", "main": "joint"}


def sharded_length(length: int, world: int) -> int:
    """The stream length padded so that each of `world` ranks gets a whole number of 32-token blocks."""
    return padded(length, world * SEQ_MULTIPLE)


def padded_heads(heads: int, world: int) -> int:
    """Heads rounded up to a multiple of `world` (zero heads are added for G ∤ heads)."""
    return heads + (-heads) % world


def _pad_tokens(t: torch.Tensor, length: int, value: float | bool = 0) -> torch.Tensor:
    """`t` padded along dim 1 to `length` with `value`."""
    extra = length - t.shape[1]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[1] = extra
    return torch.cat([t, torch.full(shape, value, dtype=t.dtype, device=t.device)], 1)


class UlyssesAttention:
    """An attention backend (B, L/G, H, D) → (B, L/G, H·D) that runs `inner` on H/G heads of the whole
    sequence: all-to-all heads ↔ sequence, `inner`, and back. `mask` is the full padded key mask."""

    def __init__(self, inner: AttentionBackend, group: dist.ProcessGroup | None = None) -> None:
        self.inner = inner
        self.group = group
        self.world = dist.get_world_size(group)

    def _exchange(self, send: torch.Tensor) -> torch.Tensor:
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        g = self.world
        b, n, heads, d = q.shape
        hp = padded_heads(heads, g)
        h = hp // g
        qkv = torch.stack([q, k, v])  # (3, B, n, H, D): one exchange for the three
        if hp != heads:
            qkv = F.pad(qkv, (0, 0, 0, hp - heads))
        # Chunk j of the first dimension goes to rank j: head group j of my tokens.
        send = qkv.view(3, b, n, g, h, d).permute(3, 0, 1, 2, 4, 5).contiguous()
        recv = self._exchange(send)  # recv[j]: rank j's tokens of my head group
        full = recv.permute(1, 2, 0, 3, 4, 5).reshape(3, b, g * n, h, d)
        out = self.inner(full[0], full[1], full[2], mask)  # (B, L, h·D)
        send = out.reshape(b, g, n, h, d).transpose(0, 1).contiguous()  # chunk j: rank j's tokens
        recv = self._exchange(send)  # recv[j]: my tokens, head group j
        out = recv.permute(1, 2, 0, 3, 4).reshape(b, n, hp, d)[:, :, :heads]
        return out.reshape(b, n, heads * d)


@dataclass
class Shard:
    """One rank's part of a stream: tokens [start, stop) of the stream padded to `length`."""

    full: int  # the stream's own length
    length: int  # padded to a multiple of world × 32
    start: int
    stop: int
    rope: torch.Tensor  # the RoPE rows of the shard
    mask: torch.Tensor | None  # the full padded key mask (pad tokens masked), or None when nothing is masked
    noisy: torch.Tensor | None  # the shard's Omni noisy flags

    @classmethod
    def of(cls, stream: Stream, world: int, rank: int) -> Shard:
        length = sharded_length(stream.length, world)
        per = length // world
        start, stop = rank * per, (rank + 1) * per
        mask = stream.mask
        if length != stream.length:
            if mask is None:
                mask = torch.ones(1, 1, 1, stream.length, dtype=torch.bool, device=stream.rope.device)
            mask = _pad_tokens(mask.transpose(1, 3), length, False).transpose(1, 3)
        noisy = None if stream.noisy is None else _pad_tokens(stream.noisy, length, True)[:, start:stop]
        rope = _pad_tokens(stream.rope, length)[:, start:stop]
        return cls(stream.length, length, start, stop, rope, mask, noisy)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return _pad_tokens(x, self.length)[:, self.start:self.stop]

    def gather(self, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 1)[:, :self.full]

    def timesteps(self, c: Timesteps) -> Timesteps:
        if isinstance(c, TokenTimesteps):
            assert self.noisy is not None
            return TokenTimesteps(c.noisy, c.clean, self.noisy)
        return c


class SequenceParallelRunner(BlockRunner):
    """A BlockRunner for one rank of a Ulysses group (see the module docstring). Every rank runs the same
    forward on the same inputs; each gets the whole result. `plan` maps runner stages to streams
    (default `ULYSSES_PLAN`)."""

    def __init__(self, group: dist.ProcessGroup | None = None, block_call: BlockCall | None = None,
                 hooks: BlockHooks | None = None, around: Callable[[], contextlib.AbstractContextManager] | None = None,
                 plan: dict[str, str] | None = None) -> None:
        super().__init__(block_call, hooks, around)
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.plan = ULYSSES_PLAN if plan is None else plan

    def _sharded(self, blocks: Sequence[nn.Module], x: torch.Tensor, stream: Stream, c: Timesteps,
                 hook: Callable[[int, torch.Tensor], torch.Tensor | None] | None) -> torch.Tensor:
        shard = Shard.of(stream, self.world, self.rank)
        local, c = shard.split(x), shard.timesteps(c)
        for i, block in enumerate(blocks):
            inner = backend_for(bool(getattr(getattr(block, "attention", None), "fp8_attention", False)))
            with use_backend(UlyssesAttention(inner, self.group)):
                local = self.block_call(block, local, shard.rope, shard.mask, c)
            if hook is not None:
                full = shard.gather(local, self.group)
                result = hook(i, full)
                local = shard.split(full if result is None else result)
        return shard.gather(local, self.group)

    def noise_refine(self, blocks: Sequence[nn.Module], img: torch.Tensor, cap: torch.Tensor,
                     layout: SequenceLayout, mod: Modulation, x: torch.Tensor) -> torch.Tensor:
        if "noise_refine" not in self.plan or self.world == 1:
            return super().noise_refine(blocks, img, cap, layout, mod, x)
        hooks, img_input = self.hooks, img
        hook = None if hooks is None else (
            lambda i, full: hooks.after_noise_refiner(i, full, img_input, cap, layout, mod.noisy, x))
        return self._sharded(blocks, img, getattr(layout, self.plan["noise_refine"]), mod.on(layout.image), hook)

    def main(self, blocks: Sequence[nn.Module], seq: torch.Tensor, layout: SequenceLayout, mod: Modulation,
             x: torch.Tensor) -> torch.Tensor:
        if "main" not in self.plan or self.world == 1:
            return super().main(blocks, seq, layout, mod, x)
        hooks, seq_input = self.hooks, seq
        hook = None if hooks is None else (
            lambda i, full: hooks.after_layer(i, full, seq_input, layout, mod.noisy, x))
        return self._sharded(blocks, seq, getattr(layout, self.plan["main"]), mod.on(layout.joint), hook)
