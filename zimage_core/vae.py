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

import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .checks import (
    checkpoint_errors,
    compute_dtype,
    numbered_blocks,
    real_number,
    release_on_error,
    require_float,
    whole_number,
)
from .errors import CheckpointError
from .safetensors_io import Checkpoint, open_checkpoint
from .vae_model import ATTN_CHUNK_BYTES, CONFIG_LIMITS, Decoder, Encoder, FluxAEConfig

__all__ = [
    "LATENT_SCALE", "LATENT_SHIFT", "FluxAEConfig", "FluxVAE", "load_vae", "normalize_latents",
    "denormalize_latents", "estimate_memory", "convert_diffusers_vae_keys",
]

log = logging.getLogger(__name__)

LATENT_SCALE = 0.3611
LATENT_SHIFT = 0.1159

_WHAT = "a FLUX.1 VAE (ae.safetensors, 16 latent channels)"
_PREFIXES = ("", "first_stage_model.", "vae.", "ae.", "autoencoder.")
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
        from .vae_model import fuse_norm_act
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
        f = self.config.downscale
        return estimate_memory("decode", shape[-2] * f, shape[-1] * f, batch=shape[0],
                               dtype=dtype or self.dtype, config=self.config)

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
        `check_interrupt` is called before each image and each tile; whatever it raises propagates
        and the intermediate results are freed.
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

        def run_tiled(t: torch.Tensor) -> torch.Tensor:
            return _tiled(self._decode_pixels, t, tile=tile_size, overlap=overlap, in_per_cell=1,
                          out_per_cell=f, out_channels=self.config.out_channels, check_interrupt=check_interrupt)

        pixels = self._run(z, self._decode_pixels, run_tiled, tiled, self.memory_used_decode, "decode",
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


# --------------------------------------------------------------------------- loading


_DIFFUSERS_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(encoder|decoder)\.conv_norm_out\."), r"\1.norm_out."),
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\."), r"encoder.down.\1.block.\2."),
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\."), r"encoder.down.\1.downsample.conv."),
    (re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.0\."), r"\1.mid.block_1."),
    (re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.1\."), r"\1.mid.block_2."),
    (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(?:group_norm)\."), r"\1.mid.attn_1.norm."),
    (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(?:to_q|query)\."), r"\1.mid.attn_1.q."),
    (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(?:to_k|key)\."), r"\1.mid.attn_1.k."),
    (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(?:to_v|value)\."), r"\1.mid.attn_1.v."),
    (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(?:to_out\.0|proj_attn)\."),
     r"\1.mid.attn_1.proj_out."),
]
_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0\.conv)\.")


def convert_diffusers_vae_keys(keys: list[str], num_levels: int) -> dict[str, str]:
    """Map diffusers AutoencoderKL parameter names to BFL names: {bfl_name: diffusers_name}.

    Unknown names map to themselves (the loader then reports them as unexpected).
    """
    out: dict[str, str] = {}
    for key in keys:
        name = key.replace(".conv_shortcut.", ".nin_shortcut.")
        m = _UP.match(name)
        if m:
            level = num_levels - 1 - int(m.group(1))  # diffusers counts up_blocks from the deepest level
            inner = f"block.{m.group(3)}" if m.group(3) is not None else "upsample.conv"
            name = f"decoder.up.{level}.{inner}." + name[m.end():]
        else:
            for pattern, repl in _DIFFUSERS_RULES:
                name, n = pattern.subn(repl, name)
                if n:
                    break
        out[name] = key
    return out


def _diagnose(path: Path, keys: list[str]) -> CheckpointError:
    """Say what a file without FLUX VAE keys most likely is."""
    joined = "\n".join(keys[:4000])
    if re.search(r"(^|\.)(x_embedder|noise_refiner|context_refiner|cap_embedder|double_blocks|"
                 r"single_blocks|joint_blocks|diffusion_model)\.", joined, re.M) or \
            re.search(r"(^|\.)layers\.\d+\.attention\.(qkv|to_q)", joined, re.M):
        return CheckpointError(path, _WHAT, "a diffusion transformer (Z-Image/Flux DiT weights, no VAE)",
                               "Load this file with the Z-Image model loader; pick ae.safetensors "
                               "(models/vae/) for the VAE.")
    if re.search(r"(embed_tokens|self_attn\.|text_model\.|encoder\.block\.\d+\.layer)", joined):
        return CheckpointError(path, _WHAT, "a text encoder (language-model weights, no VAE)",
                               "Load this file with the text encoder loader; pick ae.safetensors "
                               "(models/vae/) for the VAE.")
    sample = ", ".join(keys[:3])
    return CheckpointError(path, _WHAT, f"no VAE weights (no 'decoder.conv_in.weight'; keys look like: {sample})",
                           "Use the FLUX.1 ae.safetensors (or the vae/ folder of the diffusers "
                           "Z-Image-Turbo layout).")


def _locate(path: Path, ckpt: Checkpoint) -> tuple[str, bool]:
    """Return (key prefix, is_diffusers_naming) for the VAE inside `ckpt`."""
    for prefix in _PREFIXES:
        if prefix + "decoder.conv_in.weight" in ckpt.infos:
            diffusers = any(k.startswith(prefix + "encoder.down_blocks.") or k.startswith(prefix + "decoder.up_blocks.")
                            for k in ckpt.infos)
            return prefix, diffusers
    raise _diagnose(path, list(ckpt.infos))


_LEVELS_MAX = 8  # FLUX.1 has 4 resolution levels
_BLOCKS_MAX = 16  # and 2 resnet blocks per level


def _infer_config(path: Path, shape: Callable[[str, int], tuple[int, ...]], names: dict[str, str],
                  json_config: dict | None, json_path: Path) -> FluxAEConfig:
    z = shape("decoder.conv_in.weight", 4)[1]
    if z != 16:
        if z == 4:
            raise CheckpointError(path, _WHAT, "an SD1.5/SD2/SDXL VAE with 4 latent channels",
                                  "Z-Image needs the FLUX.1 VAE: ae.safetensors (16 latent channels), "
                                  "placed in models/vae/.")
        raise CheckpointError(path, _WHAT, f"a VAE with {z} latent channels",
                              "Z-Image needs the FLUX.1 VAE: ae.safetensors (16 latent channels).")
    if any(n.endswith("quant_conv.weight") for n in names):
        raise CheckpointError(path, _WHAT, "a VAE with quant_conv/post_quant_conv layers (FLUX.1's has none)",
                              "Use the FLUX.1 ae.safetensors.")
    required = ["encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight",
                "encoder.down.0.block.0.conv1.weight"]
    missing = [n for n in required if n not in names]
    if missing:
        raise CheckpointError(path, _WHAT, f"an incomplete VAE (missing {', '.join(missing)})",
                              "Use the complete FLUX.1 ae.safetensors (encoder and decoder).")
    fix = "Use the FLUX.1 ae.safetensors (or the vae/ folder of the diffusers Z-Image-Turbo layout)."
    with checkpoint_errors(path, _WHAT, fix):
        # Key names alone, before anything is built: an index like down.9999999 must not size a model.
        levels = numbered_blocks(names, "encoder.down.", "encoder.down", max_count=_LEVELS_MAX)
        numbered_blocks(names, "decoder.up.", "decoder.up", max_count=_LEVELS_MAX)
        blocks = numbered_blocks(names, "encoder.down.0.block.", "encoder.down.0.block", max_count=_BLOCKS_MAX)
    ch = shape("encoder.conv_in.weight", 4)[0]
    widths = [shape(f"encoder.down.{i}.block.0.conv1.weight", 4)[0] for i in range(levels)]
    if ch < 1 or any(w % ch or w < ch for w in widths):
        raise CheckpointError(path, f"{_WHAT} (level widths multiples of the stem width)",
                              f"stem width {ch} and level widths {widths}", fix)
    groups = 32
    if json_config is not None and "norm_num_groups" in json_config:
        with checkpoint_errors(json_path, "a VAE config.json", fix):  # reported under its JSON name
            groups = whole_number(json_config["norm_num_groups"], "norm_num_groups", *CONFIG_LIMITS["num_groups"])
    with checkpoint_errors(path if json_config is None else json_path, _WHAT, fix):
        return FluxAEConfig(in_channels=shape("encoder.conv_in.weight", 4)[1],
                            out_channels=shape("decoder.conv_out.weight", 4)[0], ch=ch,
                            ch_mult=tuple(w // ch for w in widths), num_res_blocks=blocks, z_channels=z,
                            num_groups=groups)


@release_on_error
def load_vae(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             operations: Any = None, channels_last: bool = False, mmap: bool = True,
             check_interrupt: Callable[[], None] | None = None) -> FluxVAE:
    """Load the FLUX.1 VAE from `ae.safetensors` (BFL names, optional `first_stage_model.`/`vae.` prefix,
    so a full checkpoint works too) or from a diffusers `vae/` folder (or the pipeline folder holding it).

    `dtype` None keeps the stored dtype. The model is built on the meta device and the weights are
    assigned tensor by tensor, moved straight to `device`: no second full copy, and each weight in
    memory of its own (never a view of the file). `mmap=False` reads with plain file reads (ComfyUI's
    --disable-mmap). `check_interrupt` is called before each tensor is read; whatever it raises
    propagates and the partly loaded weights are freed. `channels_last` stores
    conv weights NHWC; eager decode is faster NCHW (PyTorch's GroupNorm round-trips NHWC tensors through
    NCHW copies: 142 vs ~90 ms at 1024² on an H100), so NHWC pays only with `fuse_norm_act()`. Raises `CheckpointError` for anything that is not a 16-channel FLUX VAE.
    """
    dtype = compute_dtype(dtype, "load_vae: dtype")
    path = Path(path)
    if path.is_dir() and not any(path.glob("*.safetensors")) and (path / "vae").is_dir():
        path = path / "vae"  # the root of a diffusers pipeline folder (Tongyi-MAI/Z-Image-Turbo layout)
    with open_checkpoint(path, _WHAT, mmap=mmap) as ckpt:
        model = _load(path, ckpt, dtype, device, operations, check_interrupt)
    if channels_last:
        model.to_channels_last()
    return model


def _load(path: Path, ckpt: Checkpoint, dtype: torch.dtype | None, device: torch.device | str, operations: Any,
          check_interrupt: Callable[[], None] | None) -> FluxVAE:
    prefix, diffusers = _locate(path, ckpt)
    keys = [k for k in ckpt.infos if k.startswith(prefix)]
    stripped = [k[len(prefix):] for k in keys]
    json_path = path / "config.json"
    fix = "Use the FLUX.1 ae.safetensors or the diffusers vae/ folder of Z-Image-Turbo."
    if diffusers:
        with checkpoint_errors(path, _WHAT, fix):
            levels = numbered_blocks(stripped, "encoder.down_blocks.", "encoder.down_blocks", max_count=_LEVELS_MAX)
            numbered_blocks(stripped, "decoder.up_blocks.", "decoder.up_blocks", max_count=_LEVELS_MAX)
        names = {b: prefix + d for b, d in convert_diffusers_vae_keys(stripped, max(levels, 1)).items()}
        sf = (ckpt.config or {}).get("scaling_factor")
        if sf is not None:
            with checkpoint_errors(json_path, "a VAE config.json", fix):
                sf = real_number(sf, "scaling_factor", 0.0, 1e6, lo_open=True)
            if abs(sf - LATENT_SCALE) > 1e-4:
                log.warning("%s: config.json has scaling_factor %s, FLUX.1's is %s; this may be another 16-channel "
                            "VAE (e.g. SD3's) and would give wrong colours with Z-Image.", path, sf, LATENT_SCALE)
    else:
        names = {k[len(prefix):]: k for k in keys}

    def shape(name: str, ndim: int) -> tuple[int, ...]:
        found = ckpt.infos[names[name]].shape
        if len(found) != ndim:
            raise CheckpointError(path, f"{_WHAT} ({names[name]} with {ndim} dimensions)",
                                  f"{names[name]} of shape {tuple(found)}", fix)
        return found

    cfg = _infer_config(path, shape, names, ckpt.config if diffusers else None, json_path)

    with torch.device("meta"):
        model = FluxVAE(cfg, operations=operations)
    expected = model.state_dict()
    missing = [n for n in expected if n not in names]
    unexpected = [names[n] for n in names if n not in expected]
    if missing or unexpected:
        found = []
        if missing:
            found.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            found.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(path, _WHAT, "a VAE whose layout does not match: " + "; ".join(found), fix)
    # Shapes and types of every tensor come from the header: check all of them before reading any.
    for name, ref in expected.items():
        info = ckpt.infos[names[name]]
        if info.shape != tuple(ref.shape) and not (
                math.prod(info.shape) == ref.numel() and len(info.shape) == 2 and ref.ndim == 4):
            raise CheckpointError(path, _WHAT, f"tensor {names[name]} shaped {tuple(info.shape)}, expected "
                                  f"{tuple(ref.shape)} for this layout", "The file is not a FLUX.1 VAE.")
        require_float(path, names[name], info.dtype, _WHAT, fix)
    state: dict[str, torch.Tensor] = {}
    for name, ref in expected.items():
        if check_interrupt is not None:
            check_interrupt()
        t = ckpt.view(names[name])
        if t.shape != ref.shape:
            t = t.reshape(ref.shape)  # diffusers stores the attention 1x1 convs as Linear weights
        target = dtype or (t.dtype if t.element_size() >= 2 else torch.bfloat16)
        state[name] = ckpt.owned(t.to(device=device, dtype=target))
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.eval().requires_grad_(False)
    return model
