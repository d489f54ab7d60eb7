"""The FLUX.1 autoencoder network (encoder and decoder), with the original BFL parameter names.

Parameter names match `ae.safetensors` exactly (`encoder.down.0.block.1.conv2.weight`,
`decoder.up.3.upsample.conv.bias`, `decoder.mid.attn_1.proj_out.weight`, ...), so a BFL file
loads with `load_state_dict(strict=True)` and no renaming. Layers come from an injectable
`operations` namespace (default `torch.nn`) so ComfyUI can pass `comfy.ops.*`.

Everything is written to work on `channels_last` tensors (the fast conv layout on CUDA) and in
bf16: no op forces a contiguous NCHW copy or an fp32 upcast.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import BoundsError, real_number, whole_number, whole_numbers

# Upper bound for one attention score matrix (queries x keys) if SDPA uses its math kernel.
ATTN_CHUNK_BYTES = 1 << 30


CONFIG_LIMITS = {"in_channels": (1, 16), "out_channels": (1, 16), "ch": (1, 4096), "num_res_blocks": (1, 16),
           "z_channels": (1, 64), "num_groups": (1, 1024)}


@dataclass(frozen=True)
class FluxAEConfig:
    """Shape of the autoencoder. Defaults are FLUX.1's `ae.safetensors` (83.8M parameters)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    num_groups: int = 32
    eps: float = 1e-6

    def __post_init__(self) -> None:
        # Each value sizes the network that is built: generous bounds (FLUX.1's values are the defaults),
        # checked before anything exists. BoundsError is a ValueError naming the field.
        for name, (lo, hi) in CONFIG_LIMITS.items():
            object.__setattr__(self, name, whole_number(getattr(self, name), name, lo, hi))
        object.__setattr__(self, "ch_mult", whole_numbers(self.ch_mult, "ch_mult", 1, 64, count=(1, 8)))
        object.__setattr__(self, "eps", real_number(self.eps, "eps", 0.0, 1.0, lo_open=True))
        widths = [self.ch * m for m in self.ch_mult]
        if max(widths) > 16384 or any(w % self.num_groups for w in widths):
            raise BoundsError("ch_mult", list(self.ch_mult), f"channel widths (ch {self.ch} x ch_mult) of at most "
                              f"16384, each divisible by num_groups {self.num_groups}")

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _ops(operations: Any) -> Any:
    return operations if operations is not None else SimpleNamespace(
        Conv2d=nn.Conv2d, GroupNorm=nn.GroupNorm, Linear=nn.Linear)


Check = Callable[[], None]
# On the CPU one 3x3 convolution at 2048² pixels takes seconds, so a Cancel check between blocks comes too late:
# with a check, convolutions run in bands of rows of about this many input values, with a check before each.
BAND_ELEMENTS = 1 << 22


def _conv(conv: nn.Module, x: torch.Tensor, check: Check | None) -> torch.Tensor:
    """conv(x), or (with `check`, on the CPU, for a large x) the same in bands of rows: each band carries the
    kernel's halo of real neighbour rows, so every output row is computed from the same inputs as the whole
    convolution (stride 1, padding = kernel // 2, as every convolution here that `_conv` runs)."""
    b, c, h, w = x.shape
    rows = max(1, BAND_ELEMENTS // max(1, b * c * w))
    if check is None or x.device.type != "cpu" or rows >= h:
        return conv(x)
    halo = conv.kernel_size[0] // 2
    out = None
    for start in range(0, h, rows):
        check()
        stop = min(h, start + rows)
        lo, hi = max(0, start - halo), min(h, stop + halo)
        y = conv(x[:, :, lo:hi])[:, :, start - lo:start - lo + stop - start]
        if out is None:
            out = torch.empty((b, y.shape[1], h, y.shape[3]), dtype=y.dtype, device=y.device,
                              memory_format=_layout(x))
        out[:, :, start:stop] = y
    return out


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


def _norm_act(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    fused = norm.__dict__.get("fused_silu")
    if fused is not None:  # set by fuse_norm_act(): GroupNorm + SiLU in one compiled kernel
        return fused(x)
    # The norm output is a fresh tensor, so SiLU can run in place and save one activation buffer.
    return F.silu(norm(x), inplace=True)


_GN_SILU: Any = None


def _group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                     eps: float) -> torch.Tensor:
    if not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
        return F.silu(F.group_norm(x, groups, weight, bias, eps))
    # channels_last: normalize the (B, H*W, G, C/G) view directly, so input and output keep the
    # NHWC layout the convolutions use (F.group_norm would copy to NCHW and back).
    b, c, h, w = x.shape
    xf = x.permute(0, 2, 3, 1).reshape(b, h * w, groups, c // groups).float()
    var, mean = torch.var_mean(xf, dim=(1, 3), keepdim=True, correction=0)
    y = ((xf - mean) * torch.rsqrt(var + eps)).reshape(b, h, w, c) * weight.float() + bias.float()
    return F.silu(y).to(x.dtype).permute(0, 3, 1, 2)


def fuse_norm_act(module: nn.Module) -> int:
    """Run every GroupNorm+SiLU pair below `module` as one torch.compile'd kernel (one pass over the
    activations instead of three, and no NCHW copies for channels_last tensors). Shape-polymorphic,
    so a handful of small graphs cover every resolution. Falls back to eager if compilation fails.
    Returns the number of norms fused."""
    global _GN_SILU
    if _GN_SILU is None:
        _GN_SILU = torch.compile(_group_norm_silu, dynamic=True)
    count = 0
    for m in module.modules():
        if isinstance(m, nn.GroupNorm):
            m.fused_silu = _make_fused(m)
            count += 1
    return count


def _make_fused(norm: nn.GroupNorm):
    def run(x: torch.Tensor) -> torch.Tensor:
        try:
            return _GN_SILU(x, norm.weight, norm.bias, norm.num_groups, norm.eps)
        except Exception as exc:
            mod = type(exc).__module__ or ""
            if not mod.startswith(("torch._dynamo", "torch._inductor", "triton")):
                raise
            for m in list(_FUSED_NORMS):
                m.__dict__.pop("fused_silu", None)
            return F.silu(norm(x), inplace=True)
    _FUSED_NORMS.add(norm)
    return run


_FUSED_NORMS: weakref.WeakSet = weakref.WeakSet()


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: FluxAEConfig, ops: Any, **kw: Any) -> None:
        super().__init__()
        self.norm1 = ops.GroupNorm(cfg.num_groups, cin, eps=cfg.eps, affine=True, **kw)
        self.conv1 = ops.Conv2d(cin, cout, 3, padding=1, **kw)
        self.norm2 = ops.GroupNorm(cfg.num_groups, cout, eps=cfg.eps, affine=True, **kw)
        self.conv2 = ops.Conv2d(cout, cout, 3, padding=1, **kw)
        self.nin_shortcut = ops.Conv2d(cin, cout, 1, **kw) if cin != cout else None

    def forward(self, x: torch.Tensor, check: Check | None = None) -> torch.Tensor:
        h = _conv(self.conv1, _norm_act(self.norm1, x), check)
        h = _conv(self.conv2, _norm_act(self.norm2, h), check)
        if self.nin_shortcut is not None:
            x = _conv(self.nin_shortcut, x, check)
        return h.add_(x)  # h is this block's own tensor: add in place, one activation buffer fewer


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; q/k/v/proj_out are 1x1 convs (BFL layout)."""

    def __init__(self, c: int, cfg: FluxAEConfig, ops: Any, **kw: Any) -> None:
        super().__init__()
        self.norm = ops.GroupNorm(cfg.num_groups, c, eps=cfg.eps, affine=True, **kw)
        self.q = ops.Conv2d(c, c, 1, **kw)
        self.k = ops.Conv2d(c, c, 1, **kw)
        self.v = ops.Conv2d(c, c, 1, **kw)
        self.proj_out = ops.Conv2d(c, c, 1, **kw)

    def forward(self, x: torch.Tensor, check: Check | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            # (B,C,H,W) -> (B,1,HW,C); free (a view) when t is channels_last.
            return t.permute(0, 2, 3, 1).reshape(b, 1, h * w, c)

        q, k, v = tokens(self.q(n)), tokens(self.k(n)), tokens(self.v(n))
        del n
        # Head dim is the full width (512 in FLUX), above what flash kernels take; if SDPA falls back
        # to the math kernel the (HW)^2 score matrix would be materialized, so bound it by running the
        # queries in chunks (exact: every chunk still attends to all keys).
        tokens_n = h * w
        chunk = max(1, ATTN_CHUNK_BYTES // (tokens_n * q.element_size()))
        if check is not None and x.device.type == "cpu":  # Cancel between chunks of ~BAND_ELEMENTS scores
            chunk = min(chunk, max(1, BAND_ELEMENTS // tokens_n))
        if chunk >= tokens_n:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            parts = []
            for i in range(0, tokens_n, chunk):
                if check is not None:
                    check()
                parts.append(F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v))
            out = torch.cat(parts, dim=2)
        out = out.reshape(b, h, w, c).permute(0, 3, 1, 2)  # a channels_last NCHW view
        return self.proj_out(out).add_(x)


class Downsample(nn.Module):
    def __init__(self, c: int, ops: Any, **kw: Any) -> None:
        super().__init__()
        self.conv = ops.Conv2d(c, c, 3, stride=2, padding=0, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The original model pads right/bottom only, which torch's symmetric conv padding cannot express.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int, ops: Any, **kw: Any) -> None:
        super().__init__()
        self.conv = ops.Conv2d(c, c, 3, padding=1, **kw)

    def forward(self, x: torch.Tensor, check: Check | None = None) -> torch.Tensor:
        return _conv(self.conv, F.interpolate(x, scale_factor=2.0, mode="nearest"), check)


class _Mid(nn.Module):
    def __init__(self, c: int, cfg: FluxAEConfig, ops: Any, **kw: Any) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(c, c, cfg, ops, **kw)
        self.attn_1 = AttnBlock(c, cfg, ops, **kw)
        self.block_2 = ResnetBlock(c, c, cfg, ops, **kw)

    def forward(self, x: torch.Tensor, check: Check | None = None) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x, check), check), check)


class Encoder(nn.Module):
    """Pixels in [-1, 1] (B,3,H,W) -> posterior moments (B, 2*z_channels, H/8, W/8): mean then logvar."""

    def __init__(self, cfg: FluxAEConfig, ops: Any, **kw: Any) -> None:
        super().__init__()
        ops = _ops(ops)
        self.conv_in = ops.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, **kw)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            cout = cfg.ch * mult
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cin, cout, cfg, ops, **kw))
                cin = cout
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(cin, ops, **kw)
            self.down.append(level)
        self.mid = _Mid(cin, cfg, ops, **kw)
        self.norm_out = ops.GroupNorm(cfg.num_groups, cin, eps=cfg.eps, affine=True, **kw)
        self.conv_out = ops.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(_norm_act(self.norm_out, h))


class Decoder(nn.Module):
    """Raw latents (B, z_channels, h, w) -> pixels in about [-1, 1] (B,3,8h,8w).

    `up[i]` is the level at resolution 1/2**i, run from the deepest (`up[-1]`) to `up[0]`: the
    BFL order, the reverse of diffusers' `up_blocks`.
    """

    def __init__(self, cfg: FluxAEConfig, ops: Any, **kw: Any) -> None:
        super().__init__()
        ops = _ops(ops)
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = ops.Conv2d(cfg.z_channels, cin, 3, padding=1, **kw)
        self.mid = _Mid(cin, cfg, ops, **kw)
        levels: list[nn.Module] = [nn.Module() for _ in cfg.ch_mult]
        for i in reversed(range(len(cfg.ch_mult))):
            level = levels[i]
            cout = cfg.ch * cfg.ch_mult[i]
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, cout, cfg, ops, **kw))
                cin = cout
            if i != 0:
                level.upsample = Upsample(cin, ops, **kw)
        self.up = nn.ModuleList(levels)
        self.norm_out = ops.GroupNorm(cfg.num_groups, cin, eps=cfg.eps, affine=True, **kw)
        self.conv_out = ops.Conv2d(cin, cfg.out_channels, 3, padding=1, **kw)

    def forward(self, z: torch.Tensor, check: Check | None = None) -> torch.Tensor:
        """`check` (e.g. a host's Cancel check, which raises) runs before each block and, on the CPU, before each
        band of rows of the large convolutions (see `_conv`)."""
        h = self.mid(_conv(self.conv_in, z, check), check)
        for level in reversed(self.up):
            for block in level.block:
                if check is not None:
                    check()
                h = block(h, check)
            if hasattr(level, "upsample"):
                h = level.upsample(h, check)
        return _conv(self.conv_out, _norm_act(self.norm_out, h), check)
