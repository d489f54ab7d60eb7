"""Shapes, key names and random weights for the benchmarks, derived from zimage_core (never copied).

Every bench/*.py takes what it needs from here, and this module takes it from the model's own code:
- the transformer's config: `TransformerConfig.full()` (the official Z-Image-Turbo values), shrunk for CPU
  smoke runs by `dit_config(tiny=True)`; its key names and shapes: a meta-device `ZImageTransformer`;
- the fixed numbers (latent channels, the ×8 VAE factor, 2×2 patches, the 32-token padding, the caption width,
  the latent scale/shift): `zimage_core.constants`;
- the value rule of random weights: `zimage_core.demo_weights.random_value` (N(0, 1/fan_in) matrices, norm
  scales near 1, small biases and pad tokens), drawn here on any device so full-size weights never pass
  through the CPU;
- the FLUX VAE's shape: `zimage_core.vae.model.FluxAEConfig()`.

The one shape zimage_core does not own is the Qwen3-4B text encoder's full config (zimage_core reads it from
the file); `qwen3_4b_config()` is its only copy in bench/.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from zimage_core.constants import (  # noqa: E402
    LATENT_CHANNELS,
    LATENT_SCALE,
    LATENT_SHIFT,
    PATCH_SIZE,
    PIXEL_MULTIPLE,
    SEQ_MULTIPLE,
    TEXT_WIDTH,
    VAE_FACTOR,
)
from zimage_core.demo_weights import QWEN3_VOCAB, random_value  # noqa: E402
from zimage_core.transformer import TransformerConfig, ZImageTransformer  # noqa: E402

__all__ = [
    "LATENT_CHANNELS", "LATENT_SCALE", "LATENT_SHIFT", "PATCH_SIZE", "PIXEL_MULTIPLE", "SEQ_MULTIPLE", "TEXT_WIDTH",
    "VAE_FACTOR", "dit_config", "dit_shapes", "flux_vae_diffusers_config", "image_tokens", "latent_shape",
    "padded", "qwen3_4b_config", "qwen3_shapes", "random_state_dict", "random_tensor", "step_flops",
    "tiny_dit_overrides",
]

# The CPU smoke tests' transformer: full head_dim (so the RoPE axes and the fused kernels' shapes stay real),
# two main layers, one refiner layer, a narrow caption width.
_TINY_DIT = dict(dim=1536, n_layers=2, n_refiner_layers=1, n_heads=12, n_kv_heads=12, cap_feat_dim=256)


def tiny_dit_overrides() -> dict[str, int]:
    return dict(_TINY_DIT)


def dit_config(tiny: bool = False, **overrides: Any) -> TransformerConfig:
    """The official Z-Image-Turbo transformer config, or the CPU smoke-test one (`tiny`), with `overrides`."""
    changes = {**(_TINY_DIT if tiny else {}), **overrides}
    return dataclasses.replace(TransformerConfig.full(), **changes)


def dit_shapes(config: TransformerConfig | None = None) -> dict[str, tuple[int, ...]]:
    """ComfyUI single-file key names (no prefix) and shapes of our transformer: read off a meta-device model."""
    with torch.device("meta"):
        model = ZImageTransformer(config or TransformerConfig.full())
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def qwen3_4b_config(tiny: bool = False, **overrides: Any) -> dict[str, Any]:
    """transformers' Qwen3Config kwargs of Qwen3-4B (the caption width is zimage_core's TEXT_WIDTH)."""
    cfg = dict(vocab_size=QWEN3_VOCAB, hidden_size=TEXT_WIDTH, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
               rope_theta=1_000_000.0, max_position_embeddings=40960, tie_word_embeddings=True)
    if tiny:
        cfg.update(hidden_size=_TINY_DIT["cap_feat_dim"], intermediate_size=512, num_hidden_layers=3,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=128)
    cfg.update(overrides)
    return cfg


def qwen3_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """transformers' Qwen3Model state-dict names (no `model.` prefix; the tied lm_head absent) and shapes for a
    `qwen3_4b_config()`-style dict. Written out so that file writers need no transformers import."""
    h, hd, ff = config["hidden_size"], config["head_dim"], config["intermediate_size"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    s: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (config["vocab_size"], h), "norm.weight": (h,)}
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}."
        s.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                  p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                  p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                  p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
                  p + "mlp.down_proj.weight": (h, ff), p + "input_layernorm.weight": (h,),
                  p + "post_attention_layernorm.weight": (h,)})
    return s


def flux_vae_diffusers_config(tiny: bool = False) -> dict[str, Any]:
    """diffusers' AutoencoderKL kwargs of the FLUX.1 VAE, from zimage_core's FluxAEConfig and constants."""
    from zimage_core.demo_weights import DEMO_VAE
    from zimage_core.vae.model import FluxAEConfig

    # tiny: the demo VAE's widths (32, 32, 64, 64) with FLUX's two res-blocks per level
    ae = dataclasses.replace(DEMO_VAE, num_res_blocks=FluxAEConfig.num_res_blocks) if tiny else FluxAEConfig()
    n = len(ae.ch_mult)
    return dict(in_channels=ae.in_channels, out_channels=ae.out_channels, latent_channels=LATENT_CHANNELS,
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                block_out_channels=[ae.ch * m for m in ae.ch_mult], layers_per_block=ae.num_res_blocks,
                norm_num_groups=ae.num_groups, act_fn="silu", sample_size=1024, scaling_factor=LATENT_SCALE,
                shift_factor=LATENT_SHIFT, use_quant_conv=False, use_post_quant_conv=False,
                mid_block_add_attention=True)


def latent_shape(size: int, batch: int = 1, width: int | None = None) -> tuple[int, int, int, int]:
    """(batch, 16, size/8, width/8): the latent of a size × width picture."""
    return (batch, LATENT_CHANNELS, size // VAE_FACTOR, (width or size) // VAE_FACTOR)


def padded(n: int) -> int:
    """A segment's token count after padding to the multiple of SEQ_MULTIPLE."""
    return n + (-n) % SEQ_MULTIPLE


def image_tokens(size: int, width: int | None = None) -> int:
    """Image tokens of a size × width picture (one per 2×2 latent patch), before padding."""
    return (size // PIXEL_MULTIPLE) * ((width or size) // PIXEL_MULTIPLE)


def step_flops(config: TransformerConfig, size: int, batch: int, cap_len: int) -> float:
    """Forward FLOPs of one transformer call (matmuls + attention), counted as 2 per MAC."""
    d, L, R, ffn = config.dim, config.n_layers, config.n_refiner_layers, config.ffn_hidden
    n_img = padded(image_tokens(size))
    n_cap = padded(cap_len)
    n = n_img + n_cap
    per_tok = 2 * (d * 3 * d + d * d + 3 * d * ffn)
    lin = per_tok * (n * L + n_img * R + n_cap * R)
    attn = 4 * d * (n * n * L + n_img * n_img * R + n_cap * n_cap * R)
    return float(batch * (lin + attn))


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, *, device: Any = None,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """One random weight by zimage_core's rule (`random_value`), drawn with `gen` on `device` (the generator's
    device by default) in float32, then rounded to `dtype`."""
    r = torch.randn(shape, generator=gen, dtype=torch.float32, device=device or gen.device)
    return random_value(name, r).to(dtype)


def random_state_dict(shapes: dict[str, tuple[int, ...]], *, seed: int = 0, device: Any = "cpu",
                      dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random weights for every name in `shapes`, on `device`, in `dtype`, by zimage_core's rule."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return {k: random_tensor(k, s, gen, device=device, dtype=dtype) for k, s in shapes.items()}

