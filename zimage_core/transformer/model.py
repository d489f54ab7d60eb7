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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..accel import kernels
from ..checks import real_number, whole_number, whole_numbers
from ..constants import LATENT_CHANNELS, PATCH_SIZE, TEXT_WIDTH, VAE_FACTOR
from .attention import attention
from .attention import default as default_attention
from .runner import BlockCall, BlockHooks, BlockRunner, Modulation, Timesteps, TokenTimesteps
from .sequence import IMAGE_POS_IDENTITY, STYLES, ImageInput, SequenceLayout, build_layout

log = logging.getLogger(__name__)

ADALN_DIM = 256  # width of the timestep embedding that drives all modulation
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
    in_channels: int = LATENT_CHANNELS
    patch_size: int = PATCH_SIZE
    cap_feat_dim: int = TEXT_WIDTH
    axes_dims: tuple[int, ...] = field(default=(32, 48, 48))
    axes_lens: tuple[int, ...] = field(default=(1536, 512, 512))
    rope_theta: float = 256.0
    norm_eps: float = 1e-5
    t_scale: float = 1000.0
    # Omni checkpoints: width of the SigLIP2 image features (1152); None for Turbo / Base.
    siglip_feat_dim: int | None = None

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
        if self.siglip_feat_dim is not None:
            self.siglip_feat_dim = whole_number(self.siglip_feat_dim, "siglip_feat_dim", 1, 16384)
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
        return self.out(attention(q, k, v, mask, self.fp8_attention))


class FeedForward(nn.Module):
    def __init__(self, cfg: TransformerConfig, ops: Any, dd: dict[str, Any]) -> None:
        super().__init__()
        self.w1 = ops.Linear(cfg.dim, cfg.ffn_hidden, bias=False, **dd)
        self.w2 = ops.Linear(cfg.ffn_hidden, cfg.dim, bias=False, **dd)
        self.w3 = ops.Linear(cfg.dim, cfg.ffn_hidden, bias=False, **dd)

    def forward(self, x: torch.Tensor, fused: bool = False, quant: bool = False) -> torch.Tensor:
        return self.w2(kernels.silu_mul(self.w1(x), self.w3(x), fused, quant))


class TransformerBlock(nn.Module):
    """Sandwich-norm block; modulated blocks get (scale, gate) pairs from the timestep embedding.

    Its elementwise steps (norm and modulation, q/k norm and RoPE, gated residual, SwiGLU product) go
    through zimage_core.accel.kernels: fused Triton kernels on CUDA when `fused_kernels` is on (the
    default; ZImageTransformer.fused_kernels sets it for all blocks), the same math in plain torch ops
    elsewhere and under torch.compile.
    """

    fused_kernels = True
    # The fused kernels also quantise the fp8 matmuls' inputs (qkv, w1/w3, w2: accel.fp8.Fp8Act); set by
    # ZImageTransformer.fuse_fp8_activations on blocks whose matmuls are Fp8Linear.
    fp8_act_quant = False

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
                c: Timesteps | None = None) -> torch.Tensor:
        fused = self.fused_kernels and kernels.fused_ok(x)
        scale_msa = gate_msa = scale_mlp = gate_mlp = None
        if self.modulation:
            scale_msa, gate_msa, scale_mlp, gate_mlp = _per_token(self.adaLN_modulation, c, 4)
        # x += tanh(gate_msa) * norm2(attn(norm1(x) * (1 + scale_msa))); the FFN likewise (no gates or
        # scales without modulation). The attention residual also yields the FFN's modulated input.
        quant = fused and self.fp8_act_quant
        h = self.attention(kernels.norm_modulate(x, self.attention_norm1, scale_msa, fused, quant), rope, mask, fused)
        x, h = kernels.gated_residual(x, h, self.attention_norm2, gate_msa, fused, self.ffn_norm1, scale_mlp, quant)
        return kernels.gated_residual(x, self.feed_forward(h, fused, quant), self.ffn_norm2, gate_mlp, fused)[0]


def _per_token(linear: nn.Module, c: Timesteps, chunks: int) -> list[torch.Tensor]:
    """The modulation vectors from the timestep embedding: (B, 1, D) each, or (B, L, D) with per-token
    timesteps (Omni: each token takes the noisy or the clean embedding's vector)."""
    if isinstance(c, TokenTimesteps):
        noisy = linear(c.noisy).unsqueeze(1).chunk(chunks, dim=2)
        clean = linear(c.clean).unsqueeze(1).chunk(chunks, dim=2)
        return [torch.where(c.mask, a, b) for a, b in zip(noisy, clean, strict=True)]
    return list(linear(c).unsqueeze(1).chunk(chunks, dim=2))


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


@dataclass
class OmniInputs:
    """Omni reference images for one forward (what ComfyUI's Lumina2 hands its model as `ref_latents`,
    `ref_contexts` and `siglip_feats`).

    ref_latents: one (1|B, C, h, w) latent per reference, in model space (h, w even).
    captions: caption features ((L, cap_feat_dim) or (1|B, L, cap_feat_dim)), one per reference (None or
        missing: a segment of pad tokens), then those that follow the prompt's own caption.
    siglip: SigLIP features (1|B, rows, cols, siglip_feat_dim) or None, one per reference (missing: None).
    style: whose layout to follow (zimage_core.transformer.sequence): "comfyui" or "diffusers".
    """

    ref_latents: Sequence[torch.Tensor]
    captions: Sequence[torch.Tensor | None] = ()
    siglip: Sequence[torch.Tensor | None] = ()
    style: str = "comfyui"

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"OmniInputs: style must be one of {STYLES}, got {self.style!r}.")


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
        if cfg.siglip_feat_dim is not None:
            # Omni: SigLIP2 image features of the references, refined like the captions.
            self.siglip_embedder = nn.Sequential(RMSNorm(cfg.siglip_feat_dim, cfg.norm_eps, **dd),
                                                 ops.Linear(cfg.siglip_feat_dim, cfg.dim, bias=True, **dd))
            self.siglip_refiner = nn.ModuleList(TransformerBlock(cfg, ops, dd, False)
                                                for _ in range(cfg.n_refiner_layers))
            self.siglip_pad_token = nn.Parameter(torch.zeros(1, cfg.dim, dtype=dtype, device=device))
        # None = the dtype of the stored weights (bf16 when those are fp8). Settable by loaders.
        self.compute_dtype: torch.dtype | None = None
        self._layouts: dict[tuple, SequenceLayout] = {}
        self._compiled_blocks: list[nn.Module] = []
        self._compile_cache: Any = None
        self.streamer: Any = None
        self.cuda_graphs: Any = None  # zimage_core.accel.graphs.StepGraphs once use_cuda_graphs() is called

    @property
    def omni(self) -> bool:
        """Whether this is an Omni checkpoint (SigLIP layers). Any Z-Image model takes reference latents."""
        return self.config.siglip_feat_dim is not None

    def blocks(self) -> list[nn.Module]:
        """Every transformer block, in the order a forward calls them."""
        return [*self.context_refiner, *getattr(self, "siglip_refiner", []), *self.noise_refiner, *self.layers]

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
        blocks = self.blocks()
        return all(b.fused_kernels for b in blocks) if blocks else TransformerBlock.fused_kernels

    @fused_kernels.setter
    def fused_kernels(self, enabled: bool) -> None:
        for b in self.blocks():
            b.fused_kernels = bool(enabled)

    def set_fp8_attention(self, enabled: bool = True) -> None:
        """Attention through float8_e4m3fn q/k/v (zimage_core.accel.fp8_attention): a Triton fp8 flash
        kernel on Ada/Hopper/Blackwell GPUs, an emulation of its rounding elsewhere. Off by default."""
        for b in self.blocks():
            b.attention.fp8_attention = bool(enabled)

    def use_cuda_graphs(self, enabled: bool = True, max_graphs: int = 2) -> None:
        """Replay each fixed-shape forward as one CUDA graph (zimage_core.accel.graphs: the eager path with the
        host out of the loop; the first call at a shape runs eagerly, the second captures). Falls back to the
        eager forward wherever a graph cannot hold (hooks, compiled blocks, offloaded weights, CPU); replaced
        weights are noticed and the graphs captured again. `enabled=False` drops the graphs."""
        from ..accel.graphs import StepGraphs
        self.cuda_graphs = StepGraphs(max_graphs) if enabled else None

    def fuse_fp8_activations(self, enabled: bool = True) -> int:
        """Let the fused kernels hand the fp8 matmuls their inputs already quantised (per token, e4m3): the
        attention input norm·modulate (qkv), the FFN input (w1 and w3, quantised once for both) and SiLU·mul (w2).
        Only blocks whose qkv, w1, w2 and w3 are Fp8Linear (quantize_fp8); returns how many blocks."""
        from ..accel.fp8 import Fp8Linear
        count = 0
        for b in self.blocks():
            ok = all(isinstance(m, Fp8Linear) for m in (b.attention.qkv, b.feed_forward.w1, b.feed_forward.w2,
                                                        b.feed_forward.w3))
            b.fp8_act_quant = bool(enabled and ok)
            count += b.fp8_act_quant
        return count

    def quantize_fp8(self) -> int:
        """Store the block matmul weights (qkv, out, w1, w2, w3) as float8_e4m3fn with per-row scales
        (fp8 tensor-core matmuls on Ada/Hopper; dequantized matmuls elsewhere). Returns the count."""
        from ..accel.fp8 import quantize_fp8
        return quantize_fp8(nn.ModuleList(self.blocks()))

    def stream_blocks(self, device: torch.device | str, resident: int) -> Any:
        """Keep the refiners, embedders and `resident` main blocks on `device`; stream the other
        main blocks' weights from pinned CPU memory during each forward (low-VRAM mode)."""
        from ..accel.streaming import BlockStreamer
        for name, module in self.named_children():
            if name != "layers":
                module.to(device)
        for token in self._pad_tokens():
            token.data = token.data.to(device)
        self._layouts.clear()
        self.streamer = BlockStreamer(self.layers, device, resident=resident)
        return self.streamer

    def _pad_tokens(self) -> list[nn.Parameter]:
        return [self.x_pad_token, self.cap_pad_token, *([self.siglip_pad_token] if self.omni else [])]

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

    def _layout(self, captions: tuple[tuple[int, ...], ...], images: tuple[ImageInput, ...], style: str,
                siglip: bool, device: torch.device, dtype: torch.dtype,
                image_pos: tuple[float, float, float, float]) -> SequenceLayout:
        key = (captions, images, style, siglip, device, dtype, image_pos)
        layout = self._layouts.get(key)
        if layout is None:
            cfg = self.config
            layout = build_layout(captions, images, axes_dims=cfg.axes_dims, theta=cfg.rope_theta, device=device,
                                  dtype=dtype, style=style, siglip=siglip, image_pos=image_pos)
            if len(self._layouts) >= self._LAYOUT_CACHE_SIZE:
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[key] = layout
        return layout

    def runner(self, block_call: BlockCall | None = None, hooks: BlockHooks | None = None,
               around: Any = None) -> BlockRunner:
        """The runner of a forward: with compiled blocks (compile_blocks) or a compiled `block_call`, one that
        falls back to eager after a compiler failure. `around`: a context factory entered around the forward."""
        if self._compiled_blocks or hasattr(block_call, "disable"):
            from ..accel.compile import CompileFallback
            return CompileFallback(self, block_call, hooks, around)
        return BlockRunner(block_call, hooks, around)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cap_feats: list[torch.Tensor], *,
                hooks: BlockHooks | None = None, block_call: BlockCall | None = None,
                image_pos: tuple[float, float, float, float] | None = None, omni: OmniInputs | None = None,
                runner: BlockRunner | None = None) -> torch.Tensor:
        """Velocity eps - x0 for latents x (B, C, H, W) at noise levels sigma (B,) (1 = pure noise).

        cap_feats: one (L_i, cap_feat_dim) tensor per sample (or one for the whole batch); lengths may
        differ (the batch is then masked). H and W must be even. Computes in `self.dtype`; returns x's dtype.
        Optional: `hooks` between blocks, `block_call` to run the modulated blocks (e.g. compiled), and
        `image_pos` (scale_y, shift_y, scale_x, shift_x) of the image RoPE positions; `omni` reference
        images; `runner` to run the blocks (default: a BlockRunner with `block_call` and `hooks`).
        """
        default_attention()  # picked (and logged) here, outside any compiled block
        if self.cuda_graphs is not None and hooks is None and block_call is None and omni is None:
            out = self._graphed(x, sigma, cap_feats, image_pos or IMAGE_POS_IDENTITY, runner)
            if out is not None:
                return out
        runner = runner or self.runner(block_call, hooks)
        return runner.execute(lambda r: self._forward(x, sigma, cap_feats, r, image_pos or IMAGE_POS_IDENTITY, omni))

    def _graphed(self, x: Any, sigma: Any, cap_feats: Any, image_pos: tuple[float, float, float, float],
                 runner: BlockRunner | None) -> torch.Tensor | None:
        """The forward through a CUDA graph (accel.graphs), or None to run it eagerly."""
        from ..accel.graphs import plain_runner
        if not plain_runner(runner):
            return None
        self._check_latents(x, "latent")

        def plain(xs: torch.Tensor, ss: torch.Tensor, cs: list[torch.Tensor]) -> torch.Tensor:
            return BlockRunner().execute(lambda r: self._forward(xs, ss, cs, r, image_pos, None))
        return self.cuda_graphs.run(self, x, sigma, cap_feats, image_pos, plain)

    def _check_latents(self, x: Any, what: str) -> tuple[int, int]:
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != cfg.in_channels:
            found = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ZImageTransformer: expected {what} (B, {cfg.in_channels}, H, W), got {found}.")
        if not x.is_floating_point():
            raise ValueError(f"ZImageTransformer: expected float latents ({what}), got dtype {x.dtype}.")
        h, w = x.shape[-2:]
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"ZImageTransformer: {what} size {h}x{w} is not divisible by {p}. Latent sizes must be "
                             f"even, i.e. image width and height must be multiples of {VAE_FACTOR * p} pixels.")
        return h // p, w // p

    def _check_captions(self, cap_feats: Any, b: int) -> list[torch.Tensor]:
        cfg = self.config
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
        return list(cap_feats)

    def _patchify(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Image tokens in (h, w) order, each patch flattened (ph, pw, c) with c fastest."""
        b, c, h, w = x.shape
        p = self.config.patch_size
        ht, wt = h // p, w // p
        return x.to(dtype).view(b, c, ht, p, wt, p).permute(0, 2, 4, 3, 5, 1).reshape(b, ht * wt, self.config.patch_dim)

    @staticmethod
    def _pad(tokens: torch.Tensor, pad_token: torch.Tensor, length: int) -> torch.Tensor:
        """(B, n, D) tokens followed by copies of the learned pad token up to `length`."""
        if tokens.shape[1] >= length:
            return tokens
        pad = pad_token.to(device=tokens.device, dtype=tokens.dtype)
        return torch.cat([tokens, pad.expand(tokens.shape[0], length - tokens.shape[1], -1)], 1)

    def _omni_parts(self, omni: OmniInputs, b: int, device: torch.device, dtype: torch.dtype
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor | None], list[tuple]]:
        """Checked reference latents, captions and SigLIP features, each broadcast to the batch."""
        cfg = self.config
        n = len(omni.ref_latents)

        def batch(t: torch.Tensor, what: str) -> torch.Tensor:
            if t.shape[0] not in (1, b):
                raise ValueError(f"ZImageTransformer: {what} has a batch of {t.shape[0]}, the latents {b}.")
            return t.to(device=device).expand(b, *t.shape[1:]) if t.shape[0] == 1 else t.to(device=device)

        refs = []
        p = cfg.patch_size
        for j, ref in enumerate(omni.ref_latents):
            if isinstance(ref, torch.Tensor) and ref.ndim == 4 and (ref.shape[-2] % p or ref.shape[-1] % p):
                # A reference picture whose sides are multiples of 8 but not 16 (TextEncodeZImageOmni's resize
                # gives those): its last latent row / column is repeated to the patch size (ComfyUI's own model
                # cannot take such a reference at all).
                ref = F.pad(ref, (0, -ref.shape[-1] % p, 0, -ref.shape[-2] % p), mode="replicate")
            self._check_latents(ref, f"reference latent {j + 1}")
            refs.append(batch(ref, f"reference latent {j + 1}"))
        caps: list[torch.Tensor | None] = []
        for j, cap in enumerate(omni.captions):
            if cap is None:
                if j >= n:
                    raise ValueError(f"ZImageTransformer: caption segment {j + 1} after the prompt is None.")
                caps.append(None)
                continue
            if cap.ndim == 2:
                cap = cap.unsqueeze(0)
            if cap.ndim != 3 or cap.shape[-1] != cfg.cap_feat_dim or not cap.is_floating_point():
                raise ValueError(f"ZImageTransformer: reference caption {j + 1} has shape {tuple(cap.shape)}; "
                                 f"expected (tokens, {cfg.cap_feat_dim}) text-encoder features.")
            caps.append(batch(cap, f"reference caption {j + 1}"))
        caps += [None] * (n - len(caps))
        sigs: list[torch.Tensor | None] = []
        grids: list[tuple[int, int] | None] = []
        for j in range(n):
            sig = omni.siglip[j] if j < len(omni.siglip) else None
            if sig is not None and self.omni:
                if sig.ndim != 4 or sig.shape[-1] != cfg.siglip_feat_dim or 0 in sig.shape:
                    raise ValueError(f"ZImageTransformer: SigLIP features of reference {j + 1} have shape "
                                     f"{tuple(sig.shape)}; expected (1, rows, cols, {cfg.siglip_feat_dim}) from a "
                                     "SigLIP2 image encoder (CLIPVisionLoader: sigclip_vision_patch16).")
                sig = batch(sig, f"SigLIP features of reference {j + 1}")
                grids.append((int(sig.shape[1]), int(sig.shape[2])))
            else:
                sig = None  # a regular Z-Image checkpoint has no SigLIP layers: the features are not used
                grids.append(None)
            sigs.append(sig)
        return refs, caps, sigs, grids

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, cap_feats: list[torch.Tensor], runner: BlockRunner,
                 image_pos: tuple[float, float, float, float], omni: OmniInputs | None) -> torch.Tensor:
        cfg = self.config
        ht, wt = self._check_latents(x, "latent")
        b, c, h, w = x.shape
        cap_feats = self._check_captions(cap_feats, b)
        dtype = self._compute_dtype()
        device = x.device
        sigma = torch.as_tensor(sigma).reshape(-1).to(device)
        if sigma.numel() not in (1, b) or sigma.dtype == torch.bool or sigma.is_complex():
            raise ValueError(f"ZImageTransformer: sigma must be real numbers, one noise level per sample ({b}) or "
                             f"one for the batch, got {sigma.numel()} value(s) of dtype {sigma.dtype}.")
        if sigma.numel() == 1 and b > 1:
            sigma = sigma.expand(b)

        # Timestep: the model counts t = 1 - sigma (t = 0 is pure noise), scaled by 1000. Omni's clean tokens
        # (references and their captions) are at t = 1.
        t_noisy = self.t_embedder((1.0 - sigma.float()) * cfg.t_scale, dtype)
        refs: list[torch.Tensor] = []
        ref_caps: list[torch.Tensor | None] = []
        sigs: list[torch.Tensor | None] = []
        grids: list[tuple[int, int] | None] = []
        style, trailing = "comfyui", []
        if omni is not None and len(omni.ref_latents):
            refs, ref_caps, sigs, grids = self._omni_parts(omni, b, device, dtype)
            style = omni.style
            trailing, ref_caps = ref_caps[len(refs):], ref_caps[:len(refs)]
        mod = Modulation(t_noisy, self.t_embedder(torch.ones_like(sigma, dtype=torch.float32) * cfg.t_scale, dtype)
                         if refs else None)
        # A SigLIP stream: ComfyUI's whenever an Omni model has references; diffusers' only with features.
        siglip = self.omni and bool(refs) and (style == "comfyui" or any(s is not None for s in sigs))

        # Captions: every segment of every sample embedded at once, then each padded to a multiple of 32 with
        # the learned pad token (a missing reference caption is 32 pad tokens). Batch padding (prompts of
        # different lengths) is also the pad token, masked out of attention.
        per_sample = [[*ref_caps, None, *trailing] for _ in range(b)]
        pieces, lens = [], []
        for i, segs in enumerate(per_sample):
            segs[len(refs)] = cap_feats[i]
            for seg in segs:
                if seg is None:
                    lens.append(0)
                    continue
                seg = seg[i] if seg.ndim == 3 else seg
                pieces.append(seg.to(device=device, dtype=dtype))
                lens.append(int(seg.shape[0]))
        n_seg = len(per_sample[0])
        captions = tuple(tuple(lens[i * n_seg:(i + 1) * n_seg]) for i in range(b))
        images = (*(ImageInput(r.shape[-2] // cfg.patch_size, r.shape[-1] // cfg.patch_size, False, g, cfg.patch_size)
                    for r, g in zip(refs, grids, strict=True)), ImageInput(ht, wt, True, None, cfg.patch_size))
        layout = self._layout(captions, images, style, siglip, device, dtype, image_pos)

        emb = iter(self.cap_embedder(torch.cat(pieces, 0)).split([n for n in lens if n], 0))
        pad = self.cap_pad_token.to(device=device, dtype=dtype)
        rows = []
        for segments in layout.captions:
            row = [self._pad(next(emb).unsqueeze(0), pad, s.length)[0] if s.valid else pad.expand(s.length, -1)
                   for s in segments]
            rows.append(torch.cat(row, 0) if len(row) > 1 else row[0])
        cap = torch.stack([self._pad(r.unsqueeze(0), pad, layout.caption.length)[0] for r in rows], 0)

        # Images: references, then the generated latent; each padded with the learned pad token.
        tokens = [self._patchify(r, dtype) for r in refs] + [self._patchify(x, dtype)]
        emb = self.x_embedder(torch.cat(tokens, 1))
        img = torch.cat([self._pad(e, self.x_pad_token, s.length)
                         for e, s in zip(emb.split([t.shape[1] for t in tokens], 1), layout.images, strict=True)], 1)

        cap = runner.refine(self.context_refiner, cap, layout.caption)
        sig = None
        if layout.siglip is not None:
            sig = self._siglip_tokens(sigs, layout, b, device, dtype)
            sig = runner.refine(self.siglip_refiner, sig, layout.siglip)
        img = runner.noise_refine(self.noise_refiner, img, cap, layout, mod, x)

        # The joint sequence [images; SigLIP; captions] (sequence.py says why this order).
        seq = runner.main(self.layers, torch.cat([img, *([sig] if sig is not None else []), cap], 1), layout, mod, x)

        target = layout.target
        out = self.final_layer(seq[:, target.start:target.start + target.valid], t_noisy)
        p = cfg.patch_size
        out = out.view(b, ht, wt, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return (-out).to(x.dtype)

    def _siglip_tokens(self, sigs: list[torch.Tensor | None], layout: SequenceLayout, b: int, device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
        """The SigLIP stream: each reference's features embedded and padded, pad tokens for the images without."""
        pad = self.siglip_pad_token.to(device=device, dtype=dtype)
        parts = []
        for j, seg in enumerate(layout.siglips):
            sig = sigs[j] if j < len(sigs) else None
            if sig is None:
                parts.append(pad.expand(b, seg.length, -1))
                continue
            _, rows, cols, width = sig.shape
            # Both references flatten (rows, cols, C) features as (C, rows, cols) memory read as (rows*cols, C).
            feats = sig.to(dtype).permute(0, 3, 1, 2).reshape(b, rows * cols, width)
            parts.append(self._pad(self.siglip_embedder(feats), pad, seg.length))
        return torch.cat(parts, 1)
