"""Load the FLUX.1 VAE: BFL `ae.safetensors` (optionally inside a full checkpoint) or a diffusers `vae/`
folder; the config is inferred from shapes."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.io import Checkpoint, open_checkpoint
from ..checks import (
    checkpoint_errors,
    compute_dtype,
    numbered_blocks,
    real_number,
    release_on_error,
    require_float,
    whole_number,
)
from ..errors import CheckpointError
from .flux_vae import LATENT_SCALE, FluxVAE
from .model import CONFIG_LIMITS, FluxAEConfig

__all__ = ["load_vae", "convert_diffusers_vae_keys"]

log = logging.getLogger(__name__)

_WHAT = "a FLUX.1 VAE (ae.safetensors, 16 latent channels)"
_PREFIXES = ("", "first_stage_model.", "vae.", "ae.", "autoencoder.")



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
