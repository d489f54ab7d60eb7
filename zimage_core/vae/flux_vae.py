"""Pixels <-> latents with the FLUX.1 autoencoder (the VAE Z-Image-Turbo uses).

`FluxVAE.encode` takes ComfyUI IMAGE tensors (B,H,W,3) in [0, 1] and returns NORMALIZED latents
(B,16,H/8,W/8) = (mean - LATENT_SHIFT) * LATENT_SCALE, the space the transformer works in.
`FluxVAE.decode` inverts that. ComfyUI's LATENT dict holds RAW latents for Flux-family models
(its `latent_formats.Flux.process_in` normalizes on the way into the sampler), so nodes convert
with `normalize_latents` / `denormalize_latents`.

`load_vae` reads the original BFL `ae.safetensors` (optionally inside a full checkpoint under
`first_stage_model.` or `vae.`) or a diffusers `vae/` folder.

Large images: `encode`/`decode` split the work into overlapping tiles blended with a cosine
feather when the estimated activation memory does not fit (or after a CUDA out-of-memory error).
Tiling is an approximation: GroupNorm statistics are computed per tile and the decoder's receptive
field is wider than any practical overlap, so tiled output differs slightly from untiled output.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from ..checks import (
    release_on_error,
)
from ..constants import LATENT_SCALE, LATENT_SHIFT
from .model import ATTN_CHUNK_BYTES, Decoder, Encoder, FluxAEConfig

__all__ = [
    "LATENT_SCALE", "LATENT_SHIFT", "FluxAEConfig", "FluxVAE", "normalize_latents",
    "decode_memory", "decode_room", "denormalize_latents", "estimate_memory", "FREE_FRACTION", "whole_pass_room",
]

log = logging.getLogger(__name__)


# Share of free device memory a single untiled pass may plan to use (the rest covers conv
# workspaces, the allocator's fragmentation and whatever else is resident).
FREE_FRACTION = 0.8


def normalize_latents(raw: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents (what ComfyUI's LATENT holds) -> the transformer's normalized latent space."""
    return (raw - LATENT_SHIFT) * LATENT_SCALE


def denormalize_latents(z: torch.Tensor) -> torch.Tensor:
    """Normalized latents -> raw VAE latents (inverse of `normalize_latents`)."""
    return z / LATENT_SCALE + LATENT_SHIFT


# --------------------------------------------------------------------------- memory estimate


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_memory(kind: Literal["encode", "decode"], height: int, width: int, *, batch: int = 1,
                    dtype: torch.dtype = torch.bfloat16, config: FluxAEConfig | None = None) -> int:
    """Bytes of activation memory one untiled `encode`/`decode` pass needs (weights not included).

    `height`, `width` are in PIXELS for both directions. The estimate walks the network and takes
    the largest live set (a resnet block holds its input, the normalized input and the conv output;
    a resampler holds its input and output) and the mid-block attention, plus a 1.5x margin for
    conv workspaces. ComfyUI can use it as `VAE.memory_used_encode/decode` (see FluxVAE).
    """
    cfg = config or FluxAEConfig()
    px = height * width
    size = _dtype_size(dtype)
    # Mid-block attention: q, k, v, output and residual at the lowest resolution, plus the score
    # matrix if SDPA uses its math kernel (bounded by the query chunking in AttnBlock).
    mid_area = 4.0 ** -(len(cfg.ch_mult) - 1)
    tokens = px * mid_area
    peaks: list[float] = [5 * cfg.ch * cfg.ch_mult[-1] * mid_area
                          + min(tokens * tokens, ATTN_CHUNK_BYTES / size) / px]
    chans = [cfg.ch * m for m in cfg.ch_mult]
    n = len(chans)
    if kind == "encode":
        peaks.append(cfg.in_channels + cfg.ch)
        cin = cfg.ch
        for i, c in enumerate(chans):
            area = 4.0 ** -i
            peaks.append((2 * cin + c) * area)
            cin = c
            if i != n - 1:
                peaks.append(c * (2 + 0.25) * area)  # input, padded copy, strided output
        peaks.append(2 * cfg.z_channels * 4.0 ** -(n - 1))
    elif kind == "decode":
        cin = chans[-1]
        peaks.append(3 * cin * 4.0 ** -(n - 1))
        for i in reversed(range(n)):
            area = 4.0 ** -i
            peaks.append((2 * cin + chans[i]) * area)
            cin = chans[i]
            if i != 0:
                peaks.append(cin * (0.25 + 1 + 1) * 4.0 ** -(i - 1))  # input, upsampled, conv output
        peaks.append(cfg.out_channels * 2)
    else:
        raise ValueError(f"estimate_memory: kind must be 'encode' or 'decode', not {kind!r}")
    return int(1.5 * max(peaks) * px * batch * size)


def decode_memory(latent_shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.bfloat16,
                  config: FluxAEConfig | None = None) -> int:
    """Bytes of activation memory an untiled decode of latents shaped (B, C, h, w) needs (`estimate_memory`).
    A sampler can reserve it before the VAE is even loaded, so that the decode finds room."""
    cfg = config or FluxAEConfig()
    f = cfg.downscale
    return estimate_memory("decode", latent_shape[-2] * f, latent_shape[-1] * f, batch=latent_shape[0],
                           dtype=dtype, config=cfg)


def decode_room(latent_shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.bfloat16,
                config: FluxAEConfig | None = None) -> int:
    """Free device memory that lets one image of latents shaped (..., h, w) decode whole: the VAE's weights
    plus the activations with the margin of the automatic plan (FREE_FRACTION). A sampler that leaves this
    much free lets the decode after it run without evicting anything."""
    cfg = config or FluxAEConfig()
    one = (1, cfg.z_channels, latent_shape[-2], latent_shape[-1])
    return whole_pass_room(decode_memory(one, dtype, cfg)) + _weight_count(cfg) * _dtype_size(dtype)


def whole_pass_room(needed: int) -> int:
    """Free memory for which the automatic plan runs a pass estimated at `needed` bytes untiled."""
    return int(needed / FREE_FRACTION)


@functools.cache
def _weight_count(config: FluxAEConfig) -> int:
    return sum(p.numel() for p in FluxVAE(config, device="meta").parameters())


def _available_bytes(device: torch.device) -> int | None:
    """Memory an untiled pass could use on `device`, or None when unknown (then never tile automatically)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Blocks PyTorch's caching allocator holds but does not use are free for us too.
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


# --------------------------------------------------------------------------- tiling


def _tile_starts(n: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """Start offsets covering [0, n) with tiles of `tile` overlapping by at least `overlap`."""
    if n <= tile:
        return [0], n
    starts = list(range(0, n - tile, tile - overlap))
    starts.append(n - tile)  # last tile flush with the edge: never a partial tile, never a crop
    return starts, tile


def _ramp(length: int, fade_in: bool, fade_out: bool, width: int, device: torch.device) -> torch.Tensor:
    """1-D feather weights: cosine rise over `width` at a shared leading edge, fall at a shared trailing one.

    Complementary rise and fall sum to exactly 1, and no weight is 0, so the blend never divides by 0.
    """
    w = torch.ones(length, device=device)
    width = min(width, length)
    if width > 0:
        rise = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(width, device=device) + 0.5) / width)
        if fade_in:
            w[:width] = torch.minimum(w[:width], rise)
        if fade_out:
            w[-width:] = torch.minimum(w[-width:], rise.flip(0))
    return w


def _tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, tile: int, overlap: int,
           in_per_cell: int, out_per_cell: int, out_channels: int,
           check_interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """Run `fn` over overlapping tiles of NCHW `x` and blend the outputs.

    Positions are counted in latent cells (1 latent pixel = `in_per_cell` input pixels = `out_per_cell`
    output pixels) so tiles always align with the 8x grid. `check_interrupt` runs before each tile.
    """
    b, _c, h_in, w_in = x.shape
    hc, wc = h_in // in_per_cell, w_in // in_per_cell
    ys, th = _tile_starts(hc, tile, overlap)
    xs, tw = _tile_starts(wc, tile, overlap)
    out = torch.zeros(b, out_channels, hc * out_per_cell, wc * out_per_cell, device=x.device)
    weight = torch.zeros(1, 1, hc * out_per_cell, wc * out_per_cell, device=x.device)
    feather = overlap * out_per_cell
    for y in ys:
        wy = _ramp(th * out_per_cell, y > 0, y + th < hc, feather, x.device)
        for x0 in xs:
            if check_interrupt is not None:
                check_interrupt()
            wx = _ramp(tw * out_per_cell, x0 > 0, x0 + tw < wc, feather, x.device)
            piece = x[:, :, y * in_per_cell:(y + th) * in_per_cell, x0 * in_per_cell:(x0 + tw) * in_per_cell]
            result = fn(piece).float()
            mask = wy[:, None] * wx[None, :]
            region = (slice(None), slice(None), slice(y * out_per_cell, (y + th) * out_per_cell),
                      slice(x0 * out_per_cell, (x0 + tw) * out_per_cell))
            out[region] += result * mask
            weight[region] += mask
            del result, piece
    return out.div_(weight)


def _check_tiling(tile_size: int, overlap: int, unit: str) -> None:
    if tile_size < 1 or overlap < 0 or overlap >= tile_size:
        raise ValueError(f"tile_size={tile_size} and overlap={overlap} ({unit}): need tile_size >= 1 and "
                         f"0 <= overlap < tile_size.")


# --------------------------------------------------------------------------- the model


class FluxVAE(nn.Module):
    """FLUX.1 autoencoder: `encoder.*` / `decoder.*` parameters with BFL `ae.safetensors` names."""

    def __init__(self, config: FluxAEConfig | None = None, *, operations: Any = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config or FluxAEConfig()
        kw = {"dtype": dtype, "device": device}
        self.encoder = Encoder(self.config, operations, **kw)
        self.decoder = Decoder(self.config, operations, **kw)

    # -- placement ---------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    @property
    def is_channels_last(self) -> bool:
        return self.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    def to_channels_last(self) -> FluxVAE:
        """Store conv weights NHWC: the fast layout for cuDNN/bf16 tensor cores. Returns self."""
        return self.to(memory_format=torch.channels_last)

    def fuse_norm_act(self) -> FluxVAE:
        """GroupNorm+SiLU as one compiled kernel on NHWC tensors (GPU speed-up; eager fallback): also
        switches to channels_last, the layout the fused kernel reads without copies. Returns self."""
        from .model import fuse_norm_act
        fuse_norm_act(self)
        return self.to_channels_last()

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.is_channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    # -- memory ------------------------------------------------------------------------------

    def memory_used_encode(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype | None = None) -> int:
        """Bytes to encode pixels of NCHW `shape` (ComfyUI's `VAE.memory_used_encode` signature)."""
        return estimate_memory("encode", shape[-2], shape[-1], batch=shape[0], dtype=dtype or self.dtype,
                               config=self.config)

    def memory_used_decode(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype | None = None) -> int:
        """Bytes to decode latents of NCHW `shape` (ComfyUI's `VAE.memory_used_decode` signature)."""
        return decode_memory(shape, dtype or self.dtype, self.config)

    # -- encode ------------------------------------------------------------------------------

    def _encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        # The posterior mean: deterministic, what diffusers' `latent_dist.mean` and ComfyUI return.
        return self.encoder(x)[:, : self.config.z_channels]

    @release_on_error
    @torch.inference_mode()
    def encode(self, images: torch.Tensor, *, tiled: bool | None = None, tile_size: int = 512,
               overlap: int = 64, check_interrupt: Callable[[], None] | None = None) -> torch.Tensor:
        """Images (B,H,W,3) float in [0,1] -> normalized latents (B,16,H/8,W/8), float32, on the model's device.

        A 4th (alpha) channel is dropped. `tiled`: None = automatic (by memory estimate, with a tiled
        retry after a CUDA out-of-memory error); `tile_size`/`overlap` are in PIXELS (multiples of 8).
        `check_interrupt` is called before each image and each tile; whatever it raises propagates
        and the intermediate results are freed.
        """
        f = self.config.downscale
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"VAE encode: expected an image batch shaped (B, H, W, 3) (ComfyUI IMAGE), got {shape}.")
        b, h, w, c = images.shape
        if c == 4:
            images = images[..., :3]  # RGBA: the VAE is RGB-only; alpha carries no colour
        elif c != self.config.in_channels:
            raise ValueError(f"VAE encode: expected {self.config.in_channels} colour channels (RGB, channels last: "
                             f"B,H,W,C), got shape {tuple(images.shape)} with {c}. Convert the image to RGB "
                             f"(a (B,C,H,W) tensor must be permuted to (B,H,W,C)).")
        if not images.is_floating_point():
            raise ValueError(f"VAE encode: expected float pixels in [0, 1], got dtype {images.dtype}; "
                             f"divide 8-bit images by 255.")
        if h % f or w % f:
            raise ValueError(f"VAE encode: image size {w}x{h} (WxH) is not a multiple of {f}. Crop or resize it to "
                             f"{w // f * f}x{h // f * f} or {-(-w // f) * f}x{-(-h // f) * f} first "
                             f"(e.g. with an ImageScale or crop node).")
        if tile_size % f or overlap % f:
            raise ValueError(f"VAE encode: tile_size={tile_size} and overlap={overlap} must be multiples of {f} pixels.")
        _check_tiling(tile_size, overlap, "pixels")
        # Map to [-1, 1] before any cast to bf16/fp16 so the pixel values keep full precision.
        x = (images.to(self.device).permute(0, 3, 1, 2) * 2.0 - 1.0).to(self.dtype)
        x = self._prepare(x)

        def run_tiled(t: torch.Tensor) -> torch.Tensor:
            return _tiled(self._encode_mean, t, tile=tile_size // f, overlap=overlap // f, in_per_cell=f,
                          out_per_cell=1, out_channels=self.config.z_channels, check_interrupt=check_interrupt)

        raw = self._run(x, self._encode_mean, run_tiled, tiled, self.memory_used_encode, "encode", check_interrupt)
        return normalize_latents(raw.float())

    # -- decode ------------------------------------------------------------------------------

    def _decode_pixels(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    # -- raw space (ComfyUI's first-stage-model convention) -----------------------------------

    # no_grad, not inference_mode: hosts (ComfyUI) post-process the result in place.
    @torch.no_grad()
    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B,3,H,W) in [-1, 1] -> raw (unnormalized) latents (B,16,H/8,W/8), in the model's dtype."""
        return self._encode_mean(self._prepare(x.to(self.device, self.dtype)))

    @torch.no_grad()
    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B,16,h,w) -> pixels (B,3,8h,8w) in about [-1, 1], in the model's dtype."""
        return self._decode_pixels(self._prepare(z.to(self.device, self.dtype)))

    @release_on_error
    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, *, tiled: bool | None = None, tile_size: int = 64,
               overlap: int = 16, check_interrupt: Callable[[], None] | None = None) -> torch.Tensor:
        """Normalized latents (B,16,h,w) float -> images (B,8h,8w,3) float32 in [0,1], on the model's device.

        `tiled`: None = automatic (by memory estimate, with a tiled retry after a CUDA out-of-memory
        error); `tile_size`/`overlap` are in LATENT cells (64 latents = 512 pixels).
        `check_interrupt` is called before each image, tile and decoder block and, on the CPU, before each band
        of rows of a large convolution; whatever it raises propagates and the intermediate results are freed.
        """
        zc, f = self.config.z_channels, self.config.downscale
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != zc:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            hint = (" A 4-channel latent comes from an SD1.5/SDXL VAE; Z-Image latents have 16 channels."
                    if isinstance(latents, torch.Tensor) and latents.ndim == 4 and latents.shape[1] == 4 else "")
            raise ValueError(f"VAE decode: expected latents shaped (B, {zc}, h, w), got {shape}.{hint}")
        if not latents.is_floating_point():
            raise ValueError(f"VAE decode: expected float latents, got dtype {latents.dtype}.")
        _check_tiling(tile_size, overlap, "latent cells")
        z = self._prepare(denormalize_latents(latents.to(self.device, torch.float32)).to(self.dtype))

        def decode_checked(t: torch.Tensor) -> torch.Tensor:  # Cancel also between blocks and row bands
            return self.decoder(t, check_interrupt)

        def run_tiled(t: torch.Tensor) -> torch.Tensor:
            return _tiled(decode_checked, t, tile=tile_size, overlap=overlap, in_per_cell=1,
                          out_per_cell=f, out_channels=self.config.out_channels, check_interrupt=check_interrupt)

        pixels = self._run(z, decode_checked, run_tiled, tiled, self.memory_used_decode, "decode",
                           check_interrupt)
        images = (pixels.float() + 1.0).mul_(0.5).clamp_(0.0, 1.0)
        return images.permute(0, 2, 3, 1).contiguous()

    # -- dispatch ----------------------------------------------------------------------------

    def _run(self, x: torch.Tensor, whole: Callable[[torch.Tensor], torch.Tensor],
             tiles: Callable[[torch.Tensor], torch.Tensor], tiled: bool | None,
             estimate: Callable[[torch.Size, torch.dtype], int], what: str,
             check_interrupt: Callable[[], None] | None = None) -> torch.Tensor:
        def each(fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
            outs = []
            for i in range(x.shape[0]):
                if check_interrupt is not None and fn is not tiles:  # tiles check before each tile
                    check_interrupt()
                outs.append(fn(x[i:i + 1]))
            return torch.cat(outs)

        def all_at_once() -> torch.Tensor:
            if check_interrupt is not None:
                check_interrupt()
            return whole(x)

        if tiled is True:
            return each(tiles)  # one image at a time: least memory
        if tiled is False:
            return all_at_once()
        # Automatic: whole batch if it fits, else one image at a time (exact), else tiles (approximate).
        budget = _available_bytes(x.device)
        per_image = estimate(x[:1].shape, self.dtype)
        if budget is None or estimate(x.shape, self.dtype) <= FREE_FRACTION * budget:
            plan = "whole"
        elif per_image <= FREE_FRACTION * budget:
            plan = "per_image"
        else:
            plan = "tiled"
            log.info("VAE %s of %s needs ~%.1f GiB per image, %.1f GiB free: using tiles.", what,
                     tuple(x.shape), per_image / 2**30, budget / 2**30)
        try:
            if plan == "whole":
                return all_at_once()
            if plan == "per_image":
                return each(whole)
            return each(tiles)
        except torch.OutOfMemoryError:
            if x.device.type != "cuda" or plan == "tiled":
                raise
        log.warning("VAE %s of %s ran out of GPU memory; retrying with tiles (slightly approximate).",
                    what, tuple(x.shape))
        torch.cuda.empty_cache()
        return each(tiles)
