"""Tiny random FLUX-layout VAEs written in the formats users have: BFL `ae.safetensors` names and a
diffusers `vae/` folder, plus look-alike wrong files for the error tests.

The reference is a diffusers `AutoencoderKL` with the FLUX layout (16 latent channels, no quant
convs, mid-block attention) shrunk to channel widths 32/64/64/64 with GroupNorm 32, which both
diffusers and ComfyUI (whose Normalize() hard-codes 32 groups) can build.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]

TINY_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 64, 64, 64],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
# The same network in BFL/ComfyUI `ddconfig` terms.
TINY_DDCONFIG = {
    "double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}


def make_diffusers_vae(seed: int = 0, std: float = 0.05, **overrides):
    """A diffusers AutoencoderKL with every parameter drawn from N(0, std) (nothing trivially 0 or 1)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**{**TINY_CONFIG, **overrides}).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return vae


def diffusers_to_bfl(sd: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> original BFL/LDM names (the inverse of diffusers'
    `convert_ldm_vae_checkpoint`; test_vae checks the round trip against that function)."""
    out: dict[str, torch.Tensor] = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, t in sd.items():
        k = key
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.up.{num_levels - 1 - int(m.group(1))}.block.{m.group(2)}.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{num_levels - 1 - int(m.group(1))}.upsample.", k)
        k = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", k)
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)$", k)
        if m:
            k = f"{m.group(1)}.mid.attn_1.{attn[m.group(2)]}.{m.group(3)}"
            if t.ndim == 2:
                t = t[:, :, None, None]  # BFL keeps q/k/v/proj_out as 1x1 convs
        k = k.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        out[k] = t.contiguous()
    return out


def bfl_state_dict(vae) -> dict[str, torch.Tensor]:
    return diffusers_to_bfl(vae.state_dict(), len(vae.config.block_out_channels))


def write_bfl_file(path: Path, vae, prefix: str = "", extra: dict[str, torch.Tensor] | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    sd = {prefix + k: (v.to(dtype) if dtype else v) for k, v in bfl_state_dict(vae).items()}
    sd.update(extra or {})
    save_file(sd, str(path))
    return path


def write_diffusers_folder(path: Path, vae) -> Path:
    vae.save_pretrained(str(path), safe_serialization=True)
    assert (path / "config.json").is_file()
    json.loads((path / "config.json").read_text())
    return path


def write_sd_vae(path: Path) -> Path:
    """A (tiny) SD1.5/SDXL-style VAE: 4 latent channels, with quant convs, BFL/LDM names."""
    vae = make_diffusers_vae(latent_channels=4, use_quant_conv=True, use_post_quant_conv=True)
    sd = diffusers_to_bfl(vae.state_dict(), len(vae.config.block_out_channels))
    save_file(sd, str(path))
    return path


def write_transformer_file(path: Path) -> Path:
    """A few tensors named like a Z-Image DiT single file (ComfyUI naming)."""
    sd = {
        "model.diffusion_model.x_embedder.weight": torch.randn(8, 64),
        "model.diffusion_model.layers.0.attention.qkv.weight": torch.randn(24, 8),
        "model.diffusion_model.cap_pad_token": torch.randn(1, 8),
    }
    save_file(sd, str(path))
    return path


def write_text_encoder_file(path: Path) -> Path:
    sd = {
        "model.embed_tokens.weight": torch.randn(16, 8),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8),
    }
    save_file(sd, str(path))
    return path


def truncate(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def comfy_modules():
    """ComfyUI's own Encoder/Decoder module and latent formats (skips/fails via require_comfyui when absent)."""
    from tests.comfyui_reference import import_comfy

    return import_comfy("comfy.ldm.modules.diffusionmodules.model"), import_comfy("comfy.latent_formats")


def comfy_encoder_decoder(bfl: dict[str, torch.Tensor]):
    """ComfyUI-native Encoder and Decoder loaded (strict) with BFL-named weights."""
    model, _ = comfy_modules()
    enc = model.Encoder(**TINY_DDCONFIG).float().eval()
    dec = model.Decoder(**TINY_DDCONFIG).float().eval()
    enc.load_state_dict({k[len("encoder."):]: v for k, v in bfl.items() if k.startswith("encoder.")}, strict=True)
    dec.load_state_dict({k[len("decoder."):]: v for k, v in bfl.items() if k.startswith("decoder.")}, strict=True)
    return enc, dec
