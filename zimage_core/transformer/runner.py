"""The block runner: the one place that calls the transformer's blocks.

`ZImageTransformer._forward` assembles the sequence (`sequence.py` owns its layout), hands the streams to a
`BlockRunner`, and projects the generated image's tokens out. The runner decides how blocks run:

- `block_call` runs one modulated block (default: the block itself; `zimage_core.accel.compile`'s
  `CompiledBlockCall` runs it through torch.compile);
- `hooks` (`BlockHooks`) are called after each noise-refiner block and each main block (ControlNet,
  ComfyUI's block patches); they receive the `SequenceLayout`, not offsets;
- `around` is a context (factory) entered around the whole forward: e.g. the prefetch of weights that a
  partly loaded model keeps in host memory (`zimage_core.accel.prefetch_offloaded`);
- `execute(step)` runs the whole forward: a subclass may retry it (compile fallback:
  `zimage_core.accel.compile.CompileFallback`) or save state after it.

What may replace or wrap it: a step cache (skip or reuse `main` between steps), a sequence-parallel
runner (shard `seq` along the token axis inside `main`, with the layout's rope / mask / noisy rows
sharded alike, and gather before returning). Whatever replaces a method must keep its contract: return
the stream with the shape and token order it was given, and call the hooks, in block order, with the
full (gathered) stream and the layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch
from torch import nn

from .sequence import SequenceLayout, Stream


class TokenTimesteps(NamedTuple):
    """Per-token timestep embeddings (Omni): `noisy` (B, E) where `mask` (B|1, L, 1) is True, `clean` elsewhere."""

    noisy: torch.Tensor
    clean: torch.Tensor
    mask: torch.Tensor


Timesteps = torch.Tensor | TokenTimesteps


class Modulation(NamedTuple):
    """The timestep embeddings of one forward: `noisy` for the generated image; `clean` (t = 1) for Omni's
    references, or None when every token is noisy."""

    noisy: torch.Tensor
    clean: torch.Tensor | None

    def on(self, stream: Stream) -> Timesteps:
        """What a block running on `stream` is modulated with."""
        if self.clean is None or stream.noisy is None:
            return self.noisy
        return TokenTimesteps(self.noisy, self.clean, stream.noisy)


BlockCall = Callable[..., torch.Tensor]
"""`(block, x, rope, mask, c) -> x`: runs one modulated block (default: `block(x, rope, mask, c)`).
If it has a `disable()` method, a compile failure turns it off; `forward_done()` is called after a forward."""


class BlockHooks(Protocol):
    """Callbacks between blocks (e.g. ControlNet residual injection). Each returns the new hidden states or
    None to keep them; in-place edits of the tensors it gets also take effect.

    `after_noise_refiner(i, img, img_input, cap, layout, t_emb, x)`: after noise-refiner block i; img (B,
    layout.image_len, dim) is the image stream (references first, then the generated image at
    `layout.target`), img_input the refiner's input, cap the refined captions.
    `after_layer(i, seq, seq_input, layout, t_emb, x)`: after main block i; seq is the joint sequence
    (`layout.target` locates the generated image in it, `layout.caption_start` the captions).
    t_emb is the generated image's timestep embedding (B, E); x the latent input of the forward.
    """

    def after_noise_refiner(self, i: int, img: torch.Tensor, img_input: torch.Tensor, cap: torch.Tensor,
                            layout: SequenceLayout, t_emb: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None: ...

    def after_layer(self, i: int, seq: torch.Tensor, seq_input: torch.Tensor, layout: SequenceLayout,
                    t_emb: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None: ...


def call_block(block: nn.Module, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
               c: Timesteps | None = None) -> torch.Tensor:
    return block(x, rope, mask, c)


class BlockRunner:
    """Runs the blocks of one forward (see the module docstring for what plugs in)."""

    def __init__(self, block_call: BlockCall | None = None, hooks: BlockHooks | None = None,
                 around: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
        self.block_call = block_call or call_block
        self.hooks = hooks
        self.around = around

    def run(self, step: Callable[[BlockRunner], torch.Tensor]) -> torch.Tensor:
        """`step(self)` inside the `around` context."""
        with self.around() if self.around is not None else contextlib.nullcontext():
            return step(self)

    def execute(self, step: Callable[[BlockRunner], torch.Tensor]) -> torch.Tensor:
        """Run one forward (`step` assembles the sequence and calls the methods below)."""
        out = self.run(step)
        done = getattr(self.block_call, "forward_done", None)
        if done is not None:
            done()
        return out

    def refine(self, blocks: Sequence[nn.Module], x: torch.Tensor, stream: Stream) -> torch.Tensor:
        """Unmodulated refiner blocks (captions, SigLIP features)."""
        for block in blocks:
            x = block(x, stream.rope, stream.mask)
        return x

    def noise_refine(self, blocks: Sequence[nn.Module], img: torch.Tensor, cap: torch.Tensor,
                     layout: SequenceLayout, mod: Modulation, x: torch.Tensor) -> torch.Tensor:
        """The noise refiner over the image stream, with `hooks.after_noise_refiner`."""
        img_input, c = img, mod.on(layout.image)
        for i, block in enumerate(blocks):
            img = self.block_call(block, img, layout.image.rope, layout.image.mask, c)
            if self.hooks is not None:
                img = _kept(self.hooks.after_noise_refiner(i, img, img_input, cap, layout, mod.noisy, x), img)
        return img

    def main(self, blocks: Sequence[nn.Module], seq: torch.Tensor, layout: SequenceLayout, mod: Modulation,
             x: torch.Tensor) -> torch.Tensor:
        """The main blocks over the joint sequence, with `hooks.after_layer`."""
        seq_input, c = seq, mod.on(layout.joint)
        for i, block in enumerate(blocks):
            seq = self.block_call(block, seq, layout.joint.rope, layout.joint.mask, c)
            if self.hooks is not None:
                seq = _kept(self.hooks.after_layer(i, seq, seq_input, layout, mod.noisy, x), seq)
        return seq


def _kept(result: torch.Tensor | None, current: torch.Tensor) -> torch.Tensor:
    return current if result is None else result
