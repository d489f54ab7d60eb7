"""The Z-Image Fun ControlNet Union (alibaba-pai VideoX-Fun) in plain PyTorch, free of ComfyUI.

It is a side network of control blocks: the control image's latent (plus, for 2.x, an inpaint mask and
the masked image's latent) is patch-embedded like the image latent, run through transformer blocks
that see the main model's hidden states, and each control block's `after_proj` output (a "hint") is
added to the main stream after a given block. Blocks are zimage_core's transformer blocks, built
through an injectable `operations` namespace (ComfyUI passes `comfy.ops`).

Three references compute this differently; `ControlRun` does each (`style`, see its docstring):
diffusers' `ZImageControlNetModel` (padded tokens, control blocks over [image; caption], refiner hints
only in the control tower's private copy), ComfyUI's `ZImage_Control` (real image tokens only, no
caption, refiner hints in the main stream) and alibaba-pai's own VideoX-Fun
`ZImageControlTransformer2DModel`, which the files were trained with (padded tokens and caption as
diffusers, refiner hints in the main stream as ComfyUI).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checks import real_number, whole_number, whole_numbers
from ..constants import LATENT_CHANNELS
from ..transformer.model import TransformerBlock, TransformerConfig
from ..transformer.sequence import SequenceLayout, caption_ids, rope_table

# |strength| beyond this only ruins the image (alibaba-pai suggests 0.65-1.0).
STRENGTH_LIMIT = 10.0
# 2.x files take 16 control + 1 mask + 16 masked-image latent channels.
INPAINT_CHANNELS = 2 * LATENT_CHANNELS + 1
# How the noise refiner is controlled, per layout:
# "plain"          1.0: unmodulated-by-x blocks refine the control tokens; no hints in the refiner.
# "control"        2.1 / lite / tile: control blocks whose hints are added after each noise-refiner block.
# "control_layers" 2.0: the file's refiner blocks are untrained (zero); the control layers serve the
#                  noise refiner too (diffusers' add_control_noise_refiner="control_layers", ComfyUI's "broken").
REFINER_MODES = ("plain", "control", "control_layers")


@dataclass
class ControlNetConfig:
    """Shape and wiring of a Fun ControlNet. Defaults: Union 2.1 at the real width."""

    dim: int = 3840
    n_heads: int = 30
    in_channels: int = INPAINT_CHANNELS
    patch_size: int = 2
    norm_eps: float = 1e-5
    refiner: str = "control"
    n_refiner_layers: int = 2
    # Main-transformer block after which each control layer's hint is added (one per control layer).
    layer_places: tuple[int, ...] = field(default=tuple(range(0, 30, 2)))
    # Noise-refiner block after which each refiner hint is added ("control" and "control_layers").
    refiner_places: tuple[int, ...] = (0, 1)

    def __post_init__(self) -> None:
        self.dim = whole_number(self.dim, "dim", 1, 16384)
        self.n_heads = whole_number(self.n_heads, "n_heads", 1, 256)
        self.in_channels = whole_number(self.in_channels, "in_channels", 1, 256)
        self.patch_size = whole_number(self.patch_size, "patch_size", 1, 16)
        self.n_refiner_layers = whole_number(self.n_refiner_layers, "n_refiner_layers", 0, 16)
        self.layer_places = tuple(whole_numbers(self.layer_places, "layer_places", 0, 1023, count=(1, 128)))
        self.refiner_places = tuple(whole_numbers(self.refiner_places, "refiner_places", 0, 15, count=(0, 16)))
        if self.refiner not in REFINER_MODES:
            raise ValueError(f"ControlNetConfig: refiner must be one of {REFINER_MODES}, got {self.refiner!r}.")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"ControlNetConfig: dim {self.dim} must split into {self.n_heads} heads of even size.")
        if list(self.layer_places) != sorted(set(self.layer_places)) or self.layer_places[0] != 0:
            raise ValueError(f"ControlNetConfig: layer_places {list(self.layer_places)} must rise from 0.")
        if self.refiner == "control_layers" and len(self.refiner_places) > len(self.layer_places):
            raise ValueError("ControlNetConfig: more refiner hints than control layers.")

    @property
    def n_control_layers(self) -> int:
        return len(self.layer_places)

    @property
    def inpaint(self) -> bool:
        """Whether the model takes the mask and masked-image channels (2.x)."""
        return self.in_channels > LATENT_CHANNELS

    def block_config(self) -> TransformerConfig:
        """The transformer-block hyper-parameters (RoPE axes are the main model's; any valid split here)."""
        head = self.dim // self.n_heads
        side = (head // 3) // 2 * 2
        return TransformerConfig(dim=self.dim, n_heads=self.n_heads, n_kv_heads=self.n_heads,
                                 norm_eps=self.norm_eps, axes_dims=(head - 2 * side, side, side))


class ControlBlock(TransformerBlock):
    """A modulated transformer block on the control stream c. The first block of a stack adds the main
    stream x through `before_proj`; every block emits the hint `after_proj(c)`."""

    def __init__(self, cfg: TransformerConfig, ops: Any, dd: dict[str, Any], first: bool) -> None:
        super().__init__(cfg, ops, dd, True)
        self.first = first
        if first:
            self.before_proj = ops.Linear(cfg.dim, cfg.dim, bias=True, **dd)
        self.after_proj = ops.Linear(cfg.dim, cfg.dim, bias=True, **dd)

    def run(self, c: torch.Tensor, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
            t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hint, new c)."""
        if self.first:
            c = self.before_proj(c) + x
        c = TransformerBlock.forward(self, c, rope, mask, t_emb)
        return self.after_proj(c), c


class ZImageControlNet(nn.Module):
    """Weights of a Fun ControlNet. The computation between the main model's blocks is `ControlRun`."""

    def __init__(self, config: ControlNetConfig, *, operations: Any = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        ops: Any = torch.nn if operations is None else operations
        self.config = cfg = config
        bcfg = cfg.block_config()
        dd: dict[str, Any] = {"dtype": dtype, "device": device}
        self.x_embedder = ops.Linear(cfg.patch_size ** 2 * cfg.in_channels, cfg.dim, bias=True, **dd)
        self.layers = nn.ModuleList(ControlBlock(bcfg, ops, dd, i == 0) for i in range(cfg.n_control_layers))
        if cfg.refiner == "plain":
            self.refiner = nn.ModuleList(TransformerBlock(bcfg, ops, dd, True) for _ in range(cfg.n_refiner_layers))
        elif cfg.refiner == "control":
            self.refiner = nn.ModuleList(ControlBlock(bcfg, ops, dd, i == 0) for i in range(cfg.n_refiner_layers))
        else:
            self.refiner = nn.ModuleList()

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    def embed(self, control: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, in_channels, H, W) control latents → (B, H/p·W/p, dim) tokens, patches flattened as the
        main model's ((ph, pw, c), c fastest)."""
        cfg = self.config
        b, c, h, w = control.shape
        p = cfg.patch_size
        if c != cfg.in_channels or h % p or w % p:
            raise ValueError(f"ZImageControlNet: expected control latents (B, {cfg.in_channels}, H, W) with H and W "
                             f"divisible by {p}, got {tuple(control.shape)}.")
        tokens = control.to(dtype).view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return self.x_embedder(tokens.reshape(b, (h // p) * (w // p), p * p * c))


def _batch(t: torch.Tensor, b: int) -> torch.Tensor:
    """t's rows for a batch of b: as is, broadcast from one row, or cycled (ComfyUI's repeat_to_batch_size)."""
    if t.shape[0] == b:
        return t
    if t.shape[0] == 1:
        return t.expand(b, *t.shape[1:])
    return t[torch.arange(b, device=t.device) % t.shape[0]]


STYLES = ("diffusers", "comfyui", "videox")
RefinerBlock = Callable[[int, torch.Tensor], torch.Tensor]
"""`(j, x) -> x`: runs the main model's noise-refiner block j (same RoPE and timestep) on x."""


def control_window(start: float, end: float) -> tuple[float, float]:
    """The fractions of the sampling (0 = first step, 1 = last) between which the control acts; both finite in
    [0, 1] and start <= end. Raises ValueError naming the value and what to set."""
    start = real_number(start, "start_percent", 0.0, 1.0)
    end = real_number(end, "end_percent", 0.0, 1.0)
    if start > end:
        raise ValueError(f"start_percent ({start:g}) is after end_percent ({end:g}); swap them.")
    return start, end


class ControlRun:
    """The control stream during one forward of the main transformer.

    Call `after_noise_refiner` after each noise-refiner block and `after_layer` after each main block
    (in order); they add the hints (× strength) to the hidden states in place. The arguments are what the
    main model has at that point (ComfyUI's `noise_refiner` / `double_block` patch arguments): img: (B,
    L_img, dim) image tokens (L_img padded to 32, the first n_img real), img_input: the input of the noise
    refiner (refiner stage) or of the main blocks (main stage), cap / txt: the caption tokens, img_rope:
    the image tokens' RoPE (B|1, L_img, 1, D/2, 2, 2), t_emb: the timestep embedding.

    style "diffusers" (= ZImageControlNetModel + ZImageTransformer2DModel): padded image tokens, main-stage
    control blocks over [image; caption], hints on every token; the refiner hints (2.x) only steer the
    control tower: they go into a private copy of the refined image tokens (re-running the main model's
    noise-refiner blocks on it, `rerun`), which is what the first control block adds to its stream.
    style "comfyui" (= ZImage_Control + ZImageFunControlnet): real image tokens only, no caption, and the
    refiner hints go into the main model's image tokens.
    style "videox" (= alibaba-pai VideoX-Fun's ZImageControlTransformer2DModel, the training code): as
    "diffusers", but the refiner hints go into the main model's (padded) image tokens, which the main-stage
    control blocks then see.
    """

    def __init__(self, net: ZImageControlNet, control: torch.Tensor, strength: float, *, style: str,
                 axes_dims: tuple[int, ...], rope_theta: float) -> None:
        if style not in STYLES:
            raise ValueError(f"ControlRun: style must be one of {STYLES}, got {style!r}.")
        self.net = net
        self.control = control
        self.strength = real_number(strength, "strength", -STRENGTH_LIMIT, STRENGTH_LIMIT)
        self.diffusers = style != "comfyui"  # padded tokens, caption in the main-stage control blocks
        self.private_refiner = style == "diffusers"  # refiner hints only in the control tower's copy
        self.axes_dims = tuple(axes_dims)
        self.rope_theta = float(rope_theta)
        self._reset()

    def _reset(self) -> None:
        self.c: torch.Tensor | None = None
        self.private: torch.Tensor | None = None  # diffusers: refined image tokens with refiner hints
        self.cap: torch.Tensor | None = None
        self.refiner_hints: list[torch.Tensor] = []
        self.main: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self.next_layer = 0

    # -- refiner stage -----------------------------------------------------------------------------
    def _start(self, img_input: torch.Tensor, n_img: int, rope: torch.Tensor, t_emb: torch.Tensor) -> None:
        net, cfg = self.net, self.net.config
        control = _batch(self.control.to(img_input.device), img_input.shape[0])
        c = net.embed(control, img_input.dtype)
        if c.shape[1] != n_img:
            raise ValueError(f"ZImageControlNet: the control latent has {c.shape[1]} patches, the image {n_img}; "
                             "resize the control image to the latent's size.")
        if self.diffusers:
            # diffusers fills the padding rows with the main model's x_pad_token: the refiner input's rows.
            c = torch.cat([c, img_input[:, n_img:]], 1)
        if cfg.refiner == "plain":
            for block in net.refiner:
                c = block(c, rope, None, t_emb)
        self.c = c

    def _tokens(self, t: torch.Tensor, n: int) -> torch.Tensor:
        return t if self.diffusers else t[:, :n]

    def after_noise_refiner(self, i: int, img: torch.Tensor, img_input: torch.Tensor, cap: torch.Tensor,
                            img_rope: torch.Tensor, t_emb: torch.Tensor, n_img: int,
                            rerun: RefinerBlock | None = None) -> None:
        cfg = self.net.config
        rope = self._tokens(img_rope, n_img)
        if i == 0:
            self._reset()
            self._start(img_input, n_img, rope, t_emb)
        self.cap = cap
        if self.private is not None:  # diffusers: refine the private copy too
            if rerun is None:
                raise RuntimeError("ControlRun: the diffusers style needs the main model's noise refiner (rerun).")
            self.private = rerun(i, self.private)
        x = self._tokens(img_input, n_img)
        hint = None
        if cfg.refiner == "control" and i < len(self.net.refiner):
            hint, self.c = self.net.refiner[i].run(self.c, x, rope, None, t_emb)
        elif cfg.refiner == "control_layers" and i < len(cfg.refiner_places):
            # Every control layer runs here once (both references do), giving the refiner hints; the main
            # stage then starts again from layer 0 on the resulting stream.
            if i == 0:
                c = self.c
                for layer in self.net.layers:
                    h, c = layer.run(c, x, rope, None, t_emb)
                    self.refiner_hints.append(h)
                self.c = c
            hint = self.refiner_hints[i]
        if hint is None or i not in cfg.refiner_places:
            return
        hint = hint.to(img.dtype) * self.strength
        if self.private_refiner:
            self.private = (img if self.private is None else self.private) + hint
        elif self.diffusers:
            img += hint
        else:
            img[:, :n_img] += hint

    # -- main stage --------------------------------------------------------------------------------
    def _caption_rope(self, length: int, like: torch.Tensor) -> torch.Tensor:
        rope = rope_table(caption_ids(length), self.axes_dims, self.rope_theta)
        return rope.to(device=like.device, dtype=like.dtype).unsqueeze(0).unsqueeze(2)

    def after_layer(self, i: int, img: torch.Tensor, img_input: torch.Tensor, txt: torch.Tensor,
                    img_rope: torch.Tensor, t_emb: torch.Tensor, n_img: int, mask: torch.Tensor | None = None) -> None:
        """img / txt: the image and caption parts of the joint sequence after main block i (views, edited in
        place); img_input: the image part of the main blocks' input; mask: the key-padding mask (B, 1, 1, L)
        of [image; caption] when the batch's captions differ in length (e.g. CFG's positive and negative)."""
        places = self.net.config.layer_places
        if i not in places:
            return
        if self.c is None:
            raise RuntimeError("ZImageControlNet: main blocks ran before the noise refiner.")
        k = places.index(i)
        if self.main is None or k == 0:
            if self.diffusers:
                b = img_input.shape[0]
                cap = _batch(self.cap, b)
                image = self.private if self.private is not None else img_input
                x = torch.cat([image, cap], 1)
                cap_rope = _batch(self._caption_rope(cap.shape[1], img_rope), img_rope.shape[0])
                rope = torch.cat([img_rope, cap_rope], 1)
                c = torch.cat([self.c, cap.to(self.c.dtype)], 1)
            else:
                x, rope, c, mask = img_input[:, :n_img], img_rope[:, :n_img], self.c, None
            self.main = (x, rope, c, mask)
            self.next_layer = 0
        x, rope, c, mask = self.main
        hint = None
        while self.next_layer <= k:
            hint, c = self.net.layers[self.next_layer].run(c, x, rope, mask, t_emb)
            self.next_layer += 1
        self.main = (x, rope, c, mask)
        hint = hint.to(img.dtype) * self.strength
        if self.diffusers:
            li = img.shape[1]
            img += hint[:, :li]
            txt += hint[:, li:li + txt.shape[1]]
        else:
            img[:, :n_img] += hint


def control_mask(layout: SequenceLayout) -> torch.Tensor | None:
    """The key-padding mask of [target image; caption] (what the diffusers / videox-fun style control blocks
    attend over), or None when the batch needs none."""
    mask, t = layout.joint.mask, layout.target
    if mask is None:
        return None
    return torch.cat([mask[..., t.start:t.stop], mask[..., layout.caption_start:]], -1)


class ControlHooks:
    """zimage_core `BlockHooks` running one or more ControlRuns on a `ZImageTransformer` forward (the way
    to use a ControlNet without ComfyUI; ComfyUI nodes drive ControlRun through model patches instead)."""

    def __init__(self, transformer: nn.Module, runs: list[ControlRun]) -> None:
        self.transformer = transformer
        self.runs = runs

    def after_noise_refiner(self, i: int, img: torch.Tensor, img_input: torch.Tensor, cap: torch.Tensor,
                            layout: SequenceLayout, t_emb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = layout.target
        rope = layout.image.rope

        def rerun(j: int, h: torch.Tensor) -> torch.Tensor:
            return self.transformer.noise_refiner[j](h, rope[:, t.start:t.stop], None, t_emb)

        view, view_input = img[:, t.start:t.stop], img_input[:, t.start:t.stop]
        for run in self.runs:
            run.after_noise_refiner(i, view, view_input, cap, rope[:, t.start:t.stop], t_emb, t.valid, rerun)
        return img

    def after_layer(self, i: int, seq: torch.Tensor, seq_input: torch.Tensor, layout: SequenceLayout,
                    t_emb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t, cap = layout.target, layout.caption_start
        rope, mask = layout.joint.rope, control_mask(layout)
        for run in self.runs:
            run.after_layer(i, seq[:, t.start:t.stop], seq_input[:, t.start:t.stop], seq[:, cap:],
                            rope[:, t.start:t.stop], t_emb, t.valid, mask)
        return seq
