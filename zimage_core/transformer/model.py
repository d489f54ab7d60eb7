"""The Z-Image S3-DiT ("single-stream" diffusion transformer) in plain PyTorch.

Behaviour follows diffusers' `ZImageTransformer2DModel` and ComfyUI's `NextDiT` (Z-Image mode);
parameter names are ComfyUI's single-file key names, so such a state dict loads with strict=True.
`forward` returns the flow velocity v = eps - x0 (the raw network predicts x0 - eps).

Layers that hold weights are built through an injectable `operations` namespace (default
`torch.nn`) so ComfyUI can pass its `comfy.ops` classes (weight casting, offloading, fp8).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..accel import kernels
from ..accel.fp8_attention import fp8_attention
from ..checks import real_number, whole_number, whole_numbers

log = logging.getLogger(__name__)

ADALN_DIM = 256  # width of the timestep embedding that drives all modulation
SEQ_MULTIPLE = 32  # caption and image sequences are padded to a multiple of this
FP16_MAX = kernels.FP16_MAX


MAX_LAYERS = 128  # Z-Image-Turbo has 30; anything past this bound is not this architecture
# (low, high) for each whole-number field of TransformerConfig; official values: dim 3840, 30 layers,
# 2 refiner layers, 30 heads, 16 channels, patch 2, caption width 2560.
CONFIG_LIMITS = {
    "dim": (1, 16384), "n_layers": (1, MAX_LAYERS), "n_refiner_layers": (0, 16), "n_heads": (1, 256),
    "n_kv_heads": (1, 256), "in_channels": (1, 256), "patch_size": (1, 16), "cap_feat_dim": (1, 16384),
}


@dataclass
class TransformerConfig:
    """Hyper-parameters of the S3-DiT. Defaults are the official Z-Image-Turbo values."""

    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    in_channels: int = 16
    patch_size: int = 2
    cap_feat_dim: int = 2560
    axes_dims: tuple[int, ...] = field(default=(32, 48, 48))
    axes_lens: tuple[int, ...] = field(default=(1536, 512, 512))
    rope_theta: float = 256.0
    norm_eps: float = 1e-5
    t_scale: float = 1000.0

    def __post_init__(self) -> None:
        # Every value sizes modules or allocations: generous bounds, checked before anything is built
        # (a BoundsError is a ValueError naming the field; loaders report it with the file's name).
        for name, (lo, hi) in CONFIG_LIMITS.items():
            setattr(self, name, whole_number(getattr(self, name), name, lo, hi))
        self.axes_dims = whole_numbers(self.axes_dims, "axes_dims", 0, 1024, count=(1, 8))
        self.axes_lens = whole_numbers(self.axes_lens, "axes_lens", 1, 1 << 20, count=(1, 8))
        self.rope_theta = real_number(self.rope_theta, "rope_theta", 0.0, 1e12, lo_open=True)
        self.norm_eps = real_number(self.norm_eps, "norm_eps", 0.0, 1.0, lo_open=True)
        self.t_scale = real_number(self.t_scale, "t_scale", 0.0, 1e6, lo_open=True)
        if self.dim % self.n_heads:
            raise ValueError(f"TransformerConfig: dim {self.dim} is not divisible by n_heads {self.n_heads}.")
        if self.n_kv_heads != self.n_heads:
            raise ValueError(f"TransformerConfig: n_kv_heads {self.n_kv_heads} != n_heads {self.n_heads}; "
                             "Z-Image uses plain multi-head attention (no grouped KV heads).")
        if sum(self.axes_dims) != self.head_dim or any(d % 2 for d in self.axes_dims):
            raise ValueError(f"TransformerConfig: axes_dims {list(self.axes_dims)} must be even numbers "
                             f"summing to head_dim {self.head_dim}.")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        # Same expression as the reference (int(dim / 3 * 8)); 10240 for dim 3840.
        return int(self.dim / 3 * 8)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    @classmethod
    def full(cls) -> TransformerConfig:
        """The official Z-Image-Turbo transformer (6,154,908,736 parameters)."""
        return cls()


class RMSNorm(nn.Module):
    """RMSNorm with a `weight` parameter; always ours, so comfy ops never change its behaviour."""

    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # .to() is a no-op normally; it matters when ComfyUI offloads weights (lowvram) or stores fp8.
        w = self.weight.to(device=x.device, dtype=x.dtype)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


def rope_table(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> torch.Tensor:
    """Rotation matrices (L, D/2, 2, 2) float32 for integer position ids (L, n_axes).

    Frequencies 1/theta^(2k/d) and angles are computed in float64 and rounded to float32 like the
    reference, whose cos/sin come from float32 angles.
    """
    angles = []
    for axis, d in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles.append(torch.outer(ids[:, axis].to(torch.float64), freqs).float())
    angle = torch.cat(angles, dim=-1).double()
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Columns of [[cos, -sin], [sin, cos]]: col0 = (cos, sin), col1 = (-sin, cos).
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    return rot.float()


def caption_ids(length: int) -> torch.Tensor:
    """Caption slot i (pads included) sits at (i + 1, 0, 0)."""
    ids = torch.zeros(length, 3, dtype=torch.int64)
    ids[:, 0] = torch.arange(1, length + 1)
    return ids


# (scale_y, shift_y, scale_x, shift_x) of the image rows/columns in RoPE space; identity by default.
IMAGE_POS_IDENTITY = (1.0, 0.0, 1.0, 0.0)


def image_ids(cap_len_padded: int, h_tokens: int, w_tokens: int, padded_len: int,
              image_pos: tuple[float, float, float, float] = IMAGE_POS_IDENTITY) -> torch.Tensor:
    """Image tokens at (Lcap_padded + 1, row, col) in (h, w) order; pad slots at (0, 0, 0).

    `image_pos` scales and shifts the row/column positions (ComfyUI's rope_options); the identity
    gives integer ids, exactly the reference's.
    """
    n = h_tokens * w_tokens
    sy, ty, sx, tx = image_pos
    integral = image_pos == IMAGE_POS_IDENTITY
    ids = torch.zeros(padded_len, 3, dtype=torch.int64 if integral else torch.float64)
    ids[:n, 0] = cap_len_padded + 1
    rows, cols = torch.arange(h_tokens), torch.arange(w_tokens)
    if not integral:
        rows, cols = rows.double() * sy + ty, cols.double() * sx + tx
    ids[:n, 1] = rows.repeat_interleave(w_tokens)
    ids[:n, 2] = cols.repeat(h_tokens)
    return ids


def _hooked(result: torch.Tensor | None, current: torch.Tensor) -> torch.Tensor:
    return current if result is None else result


def _padded(n: int) -> int:
    return n + (-n) % SEQ_MULTIPLE


class Attention(nn.Module):
    # fp8 attention (zimage_core.accel.fp8_attention): off by default; ZImageTransformer.set_fp8_attention.
    fp8_attention = False

    def __init__(self, cfg: TransformerConfig, ops: Any, dd: dict[str, Any]) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.qkv = ops.Linear(cfg.dim, 3 * cfg.dim, bias=False, **dd)  # fused rows q | k | v
        self.out = ops.Linear(cfg.dim, cfg.dim, bias=False, **dd)
        self.q_norm = RMSNorm(cfg.head_dim, 1e-5, **dd)
        self.k_norm = RMSNorm(cfg.head_dim, 1e-5, **dd)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                fused: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.n_heads, self.head_dim)
        q, k, v = kernels.qk_norm_rope(qkv, self.q_norm, self.k_norm, rope, fused)
        if self.fp8_attention:
            return self.out(fp8_attention(q, k, v, mask).reshape(b, n, -1))
        # mask is None for equal-length batches so SDPA can pick flash/cuDNN kernels.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: TransformerConfig, ops: Any, dd: dict[str, Any]) -> None:
        super().__init__()
        self.w1 = ops.Linear(cfg.dim, cfg.ffn_hidden, bias=False, **dd)
        self.w2 = ops.Linear(cfg.ffn_hidden, cfg.dim, bias=False, **dd)
        self.w3 = ops.Linear(cfg.dim, cfg.ffn_hidden, bias=False, **dd)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        return self.w2(kernels.silu_mul(self.w1(x), self.w3(x), fused))


class TransformerBlock(nn.Module):
    """Sandwich-norm block; modulated blocks get (scale, gate) pairs from the timestep embedding.

    Its elementwise steps (norm and modulation, q/k norm and RoPE, gated residual, SwiGLU product) go
    through zimage_core.accel.kernels: fused Triton kernels on CUDA when `fused_kernels` is on (the
    default; ZImageTransformer.fused_kernels sets it for all blocks), the same math in plain torch ops
    elsewhere and under torch.compile.
    """

    fused_kernels = True

    def __init__(self, cfg: TransformerConfig, ops: Any, dd: dict[str, Any], modulation: bool) -> None:
        super().__init__()
        self.attention = Attention(cfg, ops, dd)
        self.feed_forward = FeedForward(cfg, ops, dd)
        self.attention_norm1 = RMSNorm(cfg.dim, cfg.norm_eps, **dd)
        self.ffn_norm1 = RMSNorm(cfg.dim, cfg.norm_eps, **dd)
        self.attention_norm2 = RMSNorm(cfg.dim, cfg.norm_eps, **dd)
        self.ffn_norm2 = RMSNorm(cfg.dim, cfg.norm_eps, **dd)
        self.modulation = modulation
        if modulation:
            # Z-Image: a bare Linear on the timestep embedding (no SiLU in front).
            self.adaLN_modulation = nn.Sequential(ops.Linear(min(cfg.dim, ADALN_DIM), 4 * cfg.dim, bias=True, **dd))

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                c: torch.Tensor | None = None) -> torch.Tensor:
        fused = self.fused_kernels and kernels.fused_ok(x)
        scale_msa = gate_msa = scale_mlp = gate_mlp = None
        if self.modulation:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).unsqueeze(1).chunk(4, dim=2)
        # x += tanh(gate_msa) * norm2(attn(norm1(x) * (1 + scale_msa))); the FFN likewise (no gates or
        # scales without modulation). The attention residual also yields the FFN's modulated input.
        h = self.attention(kernels.norm_modulate(x, self.attention_norm1, scale_msa, fused), rope, mask, fused)
        x, h = kernels.gated_residual(x, h, self.attention_norm2, gate_msa, fused, self.ffn_norm1, scale_mlp)
        return kernels.gated_residual(x, self.feed_forward(h, fused), self.ffn_norm2, gate_mlp, fused)[0]


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: TransformerConfig, ops: Any, dd: dict[str, Any]) -> None:
        super().__init__()
        self.mlp = nn.Sequential(ops.Linear(ADALN_DIM, 1024, bias=True, **dd), nn.SiLU(),
                                 ops.Linear(1024, min(cfg.dim, ADALN_DIM), bias=True, **dd))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int = ADALN_DIM, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(self.sinusoid(t).to(dtype))


class FinalLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, ops: Any, dd: dict[str, Any]) -> None:
        super().__init__()
        self.norm_final = ops.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6, **dd)
        self.linear = ops.Linear(cfg.dim, cfg.patch_dim, bias=True, **dd)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(min(cfg.dim, ADALN_DIM), cfg.dim, bias=True, **dd))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale = 1 + self.adaLN_modulation(c).unsqueeze(1)
        return self.linear(self.norm_final(x) * scale)


BlockCall = Callable[..., torch.Tensor]
"""`(block, x, rope, mask, c) -> x`: runs one modulated block (default: `block(x, rope, mask, c)`).
A compiled variant can be passed per call, so compiling never changes the model itself; if it has a
`disable()` method, `forward` calls it after a compiler failure and finishes eagerly."""


class BlockHooks(Protocol):
    """Callbacks between blocks (e.g. ControlNet-style residual injection). Each returns the new
    hidden states or None to keep them; in-place edits of the tensors it gets also take effect.

    `after_noise_refiner(i, img, img_input, cap, rope, t_emb, x)`: after noise-refiner block i;
    img (B, L_img_padded, dim) are the image tokens, img_input the refiner's input.
    `after_layer(i, seq, seq_input, n_img, rope, t_emb, x)`: after main block i; seq is the joint
    sequence [image (n_img padded tokens); caption], seq_input the main blocks' input.
    """

    def after_noise_refiner(self, i: int, img: torch.Tensor, img_input: torch.Tensor, cap: torch.Tensor,
                            rope: torch.Tensor, t_emb: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None: ...

    def after_layer(self, i: int, seq: torch.Tensor, seq_input: torch.Tensor, n_img: int, rope: torch.Tensor,
                    t_emb: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None: ...


def _call_block(block: nn.Module, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                c: torch.Tensor) -> torch.Tensor:
    return block(x, rope, mask, c)


@dataclass
class _Layout:
    """Per-shape constants: RoPE tables and key-padding masks (None when the batch is even)."""

    cap_rope: torch.Tensor
    img_rope: torch.Tensor
    joint_rope: torch.Tensor
    cap_mask: torch.Tensor | None
    joint_mask: torch.Tensor | None


class ZImageTransformer(nn.Module):
    """Z-Image S3-DiT. `forward(x, sigma, cap_feats)` returns the velocity eps - x0 in x's dtype."""

    _LAYOUT_CACHE_SIZE = 16

    def __init__(self, config: TransformerConfig, *, operations: Any = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        ops: Any = torch.nn if operations is None else operations  # any namespace with Linear, LayerNorm
        cfg = self.config = config
        dd: dict[str, Any] = {"dtype": dtype, "device": device}
        self.x_embedder = ops.Linear(cfg.patch_dim, cfg.dim, bias=True, **dd)
        self.t_embedder = TimestepEmbedder(cfg, ops, dd)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps, **dd),
                                          ops.Linear(cfg.cap_feat_dim, cfg.dim, bias=True, **dd))
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim, dtype=dtype, device=device))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim, dtype=dtype, device=device))
        self.noise_refiner = nn.ModuleList(TransformerBlock(cfg, ops, dd, True) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(TransformerBlock(cfg, ops, dd, False)
                                             for _ in range(cfg.n_refiner_layers))
        self.layers = nn.ModuleList(TransformerBlock(cfg, ops, dd, True) for _ in range(cfg.n_layers))
        self.final_layer = FinalLayer(cfg, ops, dd)
        # None = the dtype of the stored weights (bf16 when those are fp8). Settable by loaders.
        self.compute_dtype: torch.dtype | None = None
        self._layouts: dict[tuple, _Layout] = {}
        self._compiled_blocks: list[nn.Module] = []
        self._compile_cache: Any = None
        self.streamer: Any = None

    # -- acceleration (opt-in; see zimage_core.accel) -----------------------------------
    def compile_blocks(self, *, mode: str | None = None, refiners: bool = True,
                       cache_dir: str | os.PathLike | None = None) -> bool:
        """Regional torch.compile: the 30 main blocks share one compiled graph (plus one for the
        noise refiner's shorter sequence). Falls back to eager on compiler errors. Returns whether
        compilation is enabled. With `cache_dir`, compiled artifacts saved there by an earlier process
        are loaded first, and new ones are saved after each forward at a new shape (CompileCache)."""
        from ..accel.compile import compile_blocks
        from ..accel.compile_cache import CompileCache
        blocks = [*self.layers, *(self.noise_refiner if refiners else [])]
        if cache_dir is not None:
            self._compile_cache = CompileCache(cache_dir)
            self._compile_cache.load()
        self._compiled_blocks = blocks if compile_blocks(blocks, mode=mode) else []
        return bool(self._compiled_blocks)

    @property
    def fused_kernels(self) -> bool:
        """Whether the blocks use the fused Triton kernels where they can run (CUDA with Triton, eager)."""
        blocks = [*self.noise_refiner, *self.context_refiner, *self.layers]
        return all(b.fused_kernels for b in blocks) if blocks else TransformerBlock.fused_kernels

    @fused_kernels.setter
    def fused_kernels(self, enabled: bool) -> None:
        for b in [*self.noise_refiner, *self.context_refiner, *self.layers]:
            b.fused_kernels = bool(enabled)

    def set_fp8_attention(self, enabled: bool = True) -> None:
        """Attention through float8_e4m3fn q/k/v (zimage_core.accel.fp8_attention): a Triton fp8 flash
        kernel on Ada/Hopper/Blackwell GPUs, an emulation of its rounding elsewhere. Off by default."""
        for b in [*self.noise_refiner, *self.context_refiner, *self.layers]:
            b.attention.fp8_attention = bool(enabled)

    def quantize_fp8(self) -> int:
        """Store the block matmul weights (qkv, out, w1, w2, w3) as float8_e4m3fn with per-row scales
        (fp8 tensor-core matmuls on Ada/Hopper; dequantized matmuls elsewhere). Returns the count."""
        from ..accel.fp8 import quantize_fp8
        return quantize_fp8(nn.ModuleList([*self.noise_refiner, *self.context_refiner, *self.layers]))

    def stream_blocks(self, device: torch.device | str, resident: int) -> Any:
        """Keep the refiners, embedders and `resident` main blocks on `device`; stream the other
        main blocks' weights from pinned CPU memory during each forward (low-VRAM mode)."""
        from ..accel.streaming import BlockStreamer
        for name, module in self.named_children():
            if name != "layers":
                module.to(device)
        self.x_pad_token.data = self.x_pad_token.data.to(device)
        self.cap_pad_token.data = self.cap_pad_token.data.to(device)
        self._layouts.clear()
        self.streamer = BlockStreamer(self.layers, device, resident=resident)
        return self.streamer

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (inputs are cast to it; the output comes back in the input's dtype)."""
        return self._compute_dtype()

    @property
    def device(self) -> torch.device:
        return self.x_pad_token.device

    # -- helpers -------------------------------------------------------------------------------
    def _compute_dtype(self) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        dtype = self.x_pad_token.dtype
        if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            return dtype
        return torch.bfloat16  # fp8 storage computes in bf16

    def _layout(self, cap_lens: tuple[int, ...], h_tok: int, w_tok: int, device: torch.device,
                dtype: torch.dtype, image_pos: tuple[float, float, float, float] = IMAGE_POS_IDENTITY) -> _Layout:
        key = (cap_lens, h_tok, w_tok, device, dtype, image_pos)
        layout = self._layouts.get(key)
        if layout is not None:
            return layout
        cfg = self.config
        img_len = _padded(h_tok * w_tok)
        cap_max = max(cap_lens)
        cap_rope = rope_table(caption_ids(cap_max), cfg.axes_dims, cfg.rope_theta)
        # The image's first RoPE axis depends on its own caption's padded length.
        distinct = sorted(set(cap_lens))
        per_len = {n: rope_table(image_ids(n, h_tok, w_tok, img_len, image_pos), cfg.axes_dims, cfg.rope_theta)
                   for n in distinct}
        img_rope = torch.stack([per_len[n] for n in (cap_lens if len(distinct) > 1 else cap_lens[:1])])
        joint_rope = torch.cat([img_rope, cap_rope.unsqueeze(0).expand(img_rope.shape[0], -1, -1, -1, -1)], 1)
        cap_mask = joint_mask = None
        if len(distinct) > 1:
            lens = torch.tensor(cap_lens)
            cap_mask = (torch.arange(cap_max)[None] < lens[:, None])[:, None, None, :]
            joint_mask = (torch.arange(img_len + cap_max)[None] < (lens + img_len)[:, None])[:, None, None, :]
            cap_mask, joint_mask = cap_mask.to(device), joint_mask.to(device)
        dd = {"device": device, "dtype": dtype}
        layout = _Layout(cap_rope.unsqueeze(0).unsqueeze(2).to(**dd), img_rope.unsqueeze(2).to(**dd),
                         joint_rope.unsqueeze(2).to(**dd), cap_mask, joint_mask)
        if len(self._layouts) >= self._LAYOUT_CACHE_SIZE:
            self._layouts.pop(next(iter(self._layouts)))
        self._layouts[key] = layout
        return layout

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cap_feats: list[torch.Tensor], *,
                hooks: BlockHooks | None = None, block_call: BlockCall | None = None,
                image_pos: tuple[float, float, float, float] | None = None) -> torch.Tensor:
        """Velocity eps - x0 for latents x (B, C, H, W) at noise levels sigma (B,) (1 = pure noise).

        cap_feats: one (L_i, cap_feat_dim) tensor per sample (or one for the whole batch); lengths may
        differ (the batch is then masked). H and W must be even. Computes in `self.dtype`; returns x's dtype.
        Optional: `hooks` between blocks, `block_call` to run the modulated blocks (e.g. compiled), and
        `image_pos` (scale_y, shift_y, scale_x, shift_x) of the image RoPE positions.
        """
        kw = {"hooks": hooks, "block_call": block_call or _call_block, "image_pos": image_pos or IMAGE_POS_IDENTITY}
        disable_call = getattr(block_call, "disable", None)  # a compiled BlockCall (CompiledBlockCall)
        if not self._compiled_blocks and disable_call is None:
            return self._forward(x, sigma, cap_feats, **kw)
        try:
            out = self._forward(x, sigma, cap_feats, **kw)
        except Exception as exc:
            from ..accel.compile import is_compile_failure, uncompile_blocks
            if not is_compile_failure(exc):
                raise
            log.warning("torch.compile failed (%s: %s); running the Z-Image transformer eagerly.",
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            uncompile_blocks(self._compiled_blocks)
            self._compiled_blocks = []
            if disable_call is not None:
                disable_call()  # its later calls run eagerly too
            return self._forward(x, sigma, cap_feats, **{**kw, "block_call": _call_block})
        # Persist what this call compiled (compile caches; see zimage_core.accel.compile_cache).
        done = getattr(block_call, "forward_done", None)
        if done is not None:
            done()
        if self._compiled_blocks and self._compile_cache is not None:
            lens = tuple(len(f) for f in cap_feats) if isinstance(cap_feats, (list, tuple)) else tuple(cap_feats.shape)
            self._compile_cache.note((tuple(x.shape), lens, self._compute_dtype()))
            self._compile_cache.save_if_new()
        return out

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, cap_feats: list[torch.Tensor], *,
                 hooks: BlockHooks | None, block_call: BlockCall,
                 image_pos: tuple[float, float, float, float]) -> torch.Tensor:
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != cfg.in_channels:
            found = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ZImageTransformer: expected latents (B, {cfg.in_channels}, H, W), got {found}.")
        if not x.is_floating_point():
            raise ValueError(f"ZImageTransformer: expected float latents, got dtype {x.dtype}.")
        b, c, h, w = x.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"ZImageTransformer: latent size {h}x{w} is not divisible by {p}. Latent sizes must be "
                             f"even, i.e. image width and height must be multiples of {8 * p} pixels.")
        if isinstance(cap_feats, torch.Tensor):
            cap_feats = list(cap_feats.unbind(0)) if cap_feats.ndim == 3 else [cap_feats]
        if len(cap_feats) == 1 and b > 1:
            cap_feats = list(cap_feats) * b  # one prompt for the whole batch
        if len(cap_feats) != b:
            raise ValueError(f"ZImageTransformer: got {len(cap_feats)} caption feature tensors for a batch of {b}.")
        for i, f in enumerate(cap_feats):
            if not isinstance(f, torch.Tensor) or not f.is_floating_point():
                found = f.dtype if isinstance(f, torch.Tensor) else type(f).__name__
                raise ValueError(f"ZImageTransformer: caption features {i} must be a float tensor, got {found}.")
            if f.ndim != 2 or f.shape[-1] != cfg.cap_feat_dim or f.shape[0] == 0:
                raise ValueError(f"ZImageTransformer: caption features {i} have shape {tuple(f.shape)}; expected "
                                 f"(tokens >= 1, {cfg.cap_feat_dim}) from the Qwen3-4B text encoder (hidden size "
                                 f"{cfg.cap_feat_dim}). Check that the right text encoder is loaded.")
        dtype = self._compute_dtype()
        device = x.device
        sigma = torch.as_tensor(sigma).reshape(-1).to(device)
        if sigma.numel() not in (1, b) or sigma.dtype == torch.bool or sigma.is_complex():
            raise ValueError(f"ZImageTransformer: sigma must be real numbers, one noise level per sample ({b}) or "
                             f"one for the batch, got {sigma.numel()} value(s) of dtype {sigma.dtype}.")
        if sigma.numel() == 1 and b > 1:
            sigma = sigma.expand(b)

        # Timestep: the model counts t = 1 - sigma (t = 0 is pure noise), scaled by 1000.
        t_emb = self.t_embedder((1.0 - sigma.float()) * cfg.t_scale, dtype)

        # Image tokens in (h, w) order, each patch flattened (ph, pw, c) with c fastest.
        ht, wt = h // p, w // p
        n_img = ht * wt
        img = x.to(dtype).view(b, c, ht, p, wt, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n_img, cfg.patch_dim)
        img = self.x_embedder(img)
        img_len = _padded(n_img)
        if img_len > n_img:
            pad = self.x_pad_token.to(device=device, dtype=img.dtype)
            img = torch.cat([img, pad.expand(b, img_len - n_img, -1)], 1)

        # Captions: embed unpadded tokens once, then pad each to a multiple of 32 with the learned pad
        # token. Batch padding (different lengths) is also filled with it but masked out of attention.
        lens = [int(f.shape[0]) for f in cap_feats]
        cap_lens = tuple(_padded(n) for n in lens)
        cap_max = max(cap_lens)
        emb = self.cap_embedder(torch.cat([f.to(device=device, dtype=dtype) for f in cap_feats], 0))
        pad = self.cap_pad_token.to(device=device, dtype=emb.dtype)
        rows = [torch.cat([e, pad.expand(cap_max - n, -1)], 0) if cap_max > n else e
                for e, n in zip(emb.split(lens, 0), lens, strict=True)]
        cap = torch.stack(rows, 0)

        layout = self._layout(cap_lens, ht, wt, device, dtype, image_pos)
        # Captions first, so hooks after the noise refiner see refined captions (as in ComfyUI).
        for layer in self.context_refiner:
            cap = layer(cap, layout.cap_rope, layout.cap_mask)
        img_input = img
        for i, layer in enumerate(self.noise_refiner):
            img = block_call(layer, img, layout.img_rope, None, t_emb)
            if hooks is not None:
                img = _hooked(hooks.after_noise_refiner(i, img, img_input, cap, layout.img_rope, t_emb, x), img)

        # Joint sequence [image; caption]: every sample's valid tokens are contiguous from 0, and the
        # image tokens sit at the same offsets in every sample.
        seq = torch.cat([img, cap], 1)
        seq_input = seq
        for i, layer in enumerate(self.layers):
            seq = block_call(layer, seq, layout.joint_rope, layout.joint_mask, t_emb)
            if hooks is not None:
                seq = _hooked(hooks.after_layer(i, seq, seq_input, img_len, layout.joint_rope, t_emb, x), seq)

        out = self.final_layer(seq[:, :n_img], t_emb)
        out = out.view(b, ht, wt, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return (-out).to(x.dtype)
