"""Tiny random Z-Image transformers in the real checkpoint formats, and the diffusers reference output.

The reference is always diffusers' own `ZImageTransformer2DModel`; the ComfyUI-format converter here is
written independently of the product's loader so a loader bug cannot hide behind a shared helper.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY = dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
            axes_dims=[8, 12, 12], axes_lens=[256, 64, 64], rope_theta=256.0)
COMFY_PREFIX = "model.diffusion_model."


def make_diffusers_model(seed: int = 0, **overrides):
    """A diffusers ZImageTransformer2DModel with every parameter (pad tokens too) drawn from N(0, 0.05)."""
    from diffusers import ZImageTransformer2DModel

    cfg = {**TINY, **overrides}
    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, **cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def diffusers_velocity(model, x: torch.Tensor, sigma: torch.Tensor, caps: list[torch.Tensor]) -> torch.Tensor:
    """Flow velocity from diffusers: its raw output is x0 - eps and takes t = 1 - sigma; negate it."""
    with torch.no_grad():
        out = model([xi.unsqueeze(1) for xi in x], 1.0 - sigma, caps, return_dict=False)[0]
    return -torch.stack([o.squeeze(1) for o in out])


def to_comfy(state_dict: dict[str, torch.Tensor], prefix: str = COMFY_PREFIX,
             stray_norm_final: bool = True) -> dict[str, torch.Tensor]:
    """diffusers names -> ComfyUI single-file names (fused q|k|v rows), as ComfyUI's own export writes."""
    out = {}
    for key, value in state_dict.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            k, v = key.replace("to_q", "to_k"), key.replace("to_q", "to_v")
            out[key.replace("to_q", "qkv")] = torch.cat([value, state_dict[k], state_dict[v]])
            continue
        new = (key.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
               .replace(".to_out.0.", ".out.").replace(".norm_q.", ".q_norm.").replace(".norm_k.", ".k_norm."))
        out[new] = value
    if stray_norm_final:
        dim = state_dict["cap_pad_token"].shape[-1]
        out["norm_final.weight"] = torch.ones(dim)
    return {prefix + k: v.contiguous() for k, v in out.items()}


def write_comfy_file(model, path: Path, dtype: torch.dtype = torch.float32, prefix: str = COMFY_PREFIX) -> Path:
    sd = to_comfy({k: v.detach() for k, v in model.state_dict().items()}, prefix)
    save_file({k: v.to(dtype) for k, v in sd.items()}, str(path))
    return path


def write_diffusers_folder(model, folder: Path, sharded: bool = False) -> Path:
    """save_pretrained layout; sharded=True gives several shards plus the *.index.json."""
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size="60KB" if sharded else "10GB")
    return folder


def dequantized_copy(model, dtype: torch.dtype):
    """The same diffusers model with weights rounded through `dtype` storage (compared in fp32)."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.copy_(p.to(dtype).to(torch.float32))
    return clone


def ragged_inputs(seed: int = 1, cap_dim: int = 32, cap_lens=(7, 45), hw=(10, 14), batch: int = 2):
    """Two captions of very different lengths (pad to 32 and 64) and a 10x14 latent (35 tokens -> 64)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, *hw, generator=gen)
    sigma = torch.linspace(0.9, 0.3, batch)
    caps = [torch.randn(n, cap_dim, generator=gen) for n in cap_lens]
    return x, sigma, caps


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def import_comfy():
    """(comfy.ops, NextDiT) from the ComfyUI install (skips/fails via require_comfyui when absent)."""
    from tests.comfyui_reference import import_comfy as _import

    return _import("comfy.ops"), _import("comfy.ldm.lumina.model").NextDiT
