"""Z-Image as ComfyUI's core MODEL: zimage_core's transformer inside ComfyUI's own Z-Image model class.

ComfyUI's native Z-Image is `model_base.Lumina2` + `supported_models.ZImage` + `NextDiT`. We keep the
first two, so everything ComfyUI keys on them applies unchanged (Flux latent format, shift-3 flow
sampling, memory factor, LoRA key maps including diffusers' split q/k/v onto the fused qkv, Omni
conditioning), and swap NextDiT for zimage_core's transformer, called the way ComfyUI calls NextDiT. Its
parameter names are ComfyUI's, so `diffusion_model.*` keys are the same as the native model's.

This module assembles the MODEL; the call convention is `model_call.py`, the dtype and operations policy
`precision.py`, the memory and offload policy `memory.py`, ComfyUI-version differences `comfy_compat.py`.
"""

from __future__ import annotations

import logging
from typing import Any

import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models
import torch

from ..zimage_core.transformer import ZImageTransformer
from .comfy_compat import ClassicPatcher, CorePatcher, archive_model_dtypes, set_quant_config
from .errors import load_explained
from .gguf import GGUFLayerLoader, GGUFPatching, gguf_operations
from .memory import ZImageBaseModel, make_patcher
from .model_call import BLOCK_CALL_KEY, OMNI_REFERENCE_KEY, ZImageDiffusionModel, use_step_graphs
from .precision import (
    COMPUTE_DTYPES,
    WEIGHT_DTYPES,
    ComfyLayerLoader,
    compute_dtype_for,
    fp32_compute,
    manual_cast_for,
    model_config_for,
    operations_for,
    quantized_manual_cast,
)

__all__ = [
    "BLOCK_CALL_KEY", "COMPUTE_DTYPES", "CorePatcher", "OMNI_REFERENCE_KEY", "WEIGHT_DTYPES", "ZImageDiffusionModel",
    "as_core_model", "compute_dtype_for", "fp32_compute", "is_zimage_model", "load_options", "load_zimage_model",
]

log = logging.getLogger("ComfyUI-ZImage")
WHAT = "a Z-Image-Turbo diffusion model (e.g. z_image_turbo_bf16.safetensors)"
FIX = "Put the Z-Image transformer file in models/diffusion_models and select it."


def load_options() -> dict:
    """What every zimage_core loader gets from ComfyUI: its --disable-mmap, and Cancel between tensors."""
    import comfy.cli_args

    return {"mmap": not getattr(comfy.cli_args.args, "disable_mmap", False),
            "check_interrupt": mm.throw_exception_if_processing_interrupted}


def _unet_config(model: ZImageTransformer) -> dict:
    """ComfyUI's unet_config for this transformer (what model detection would produce for the file)."""
    cfg = model.config
    out = {
        "image_model": "lumina2", "dim": cfg.dim, "n_layers": cfg.n_layers, "n_refiner_layers": cfg.n_refiner_layers,
        "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "in_channels": cfg.in_channels,
        "patch_size": cfg.patch_size, "cap_feat_dim": cfg.cap_feat_dim, "axes_dims": list(cfg.axes_dims),
        "axes_lens": list(cfg.axes_lens), "rope_theta": cfg.rope_theta, "qk_norm": True, "z_image_modulation": True,
        "pad_tokens_multiple": 32, "time_scale": cfg.t_scale,
        # The diffusion model is ours, built by zimage_core; ComfyUI must not build a NextDiT.
        "disable_unet_model_creation": True,
    }
    if cfg.siglip_feat_dim is not None:
        out["siglip_feat_dim"] = cfg.siglip_feat_dim
    return out


def load_zimage_model(path: str, weight_dtype: str) -> comfy.model_patcher.ModelPatcher:
    """A core MODEL (ModelPatcher over model_base.Lumina2) whose diffusion model is zimage_core's."""
    from ..zimage_core.checkpoint.gguf import is_gguf
    from ..zimage_core.transformer import load_transformer, transformer_quant_layers

    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    if is_gguf(path):
        return _load_gguf_model(path, weight_dtype, load_device, offload_device)
    compute = compute_dtype_for(load_device)
    storage = WEIGHT_DTYPES[weight_dtype]
    fp8_attention = storage == "fp8_matmul_attention"
    fp8_matmul = storage in ("fp8_matmul", "fp8_matmul_attention")
    if fp8_matmul:
        storage = compute  # quantized after loading; the small layers stay in the compute dtype
    if storage is None:
        # "default": what ComfyUI picks for this device (respects --bf16-unet, --fp8_e4m3fn-unet ...).
        storage = mm.unet_dtype(load_device, supported_dtypes=COMPUTE_DTYPES)
    # A comfy_quant (mixed-precision) file runs through ComfyUI's own mixed-precision layers, which keep its
    # quantized weights as they are, unless our own fp8 matmuls were asked for (those quantize bf16 weights).
    quant_layers = {} if fp8_matmul else load_explained(lambda: transformer_quant_layers(path), path, WHAT, FIX)
    model_config = model_config_for(quant_layers)
    # Compute as ComfyUI would for this storage on this device (e.g. bf16 weights computed in fp32 on the CPU).
    manual_cast = quantized_manual_cast(load_device) if quant_layers else manual_cast_for(storage, load_device)
    compute = manual_cast or storage
    ops = operations_for(model_config, storage, manual_cast, load_device)
    layer_loader = ComfyLayerLoader.for_operations(ops) if quant_layers else None
    diffusion_model = load_explained(
        lambda: load_transformer(path, dtype=storage, device=offload_device, operations=ops,
                                 model_class=ZImageDiffusionModel, layer_loader=layer_loader,
                                 **load_options()), path, WHAT, FIX)
    diffusion_model.eval().requires_grad_(False)
    if fp8_matmul:
        diffusion_model.quantize_fp8()
    if fp8_attention:
        diffusion_model.set_fp8_attention(True)
    if manual_cast is not None:
        diffusion_model.compute_dtype = compute  # e.g. fp8/fp16 storage computed in bf16 (fp32 on the CPU)

    log.info("Z-Image model %s: weights %s%s, compute %s, load device %s", path, storage,
             f" ({len(quant_layers)} comfy_quant layers)" if quant_layers else "", compute, load_device)
    return as_core_model(diffusion_model, storage, manual_cast, load_device, offload_device, quant_layers)


def _load_gguf_model(path: str, weight_dtype: str, load_device: torch.device,
                     offload_device: torch.device) -> comfy.model_patcher.ModelPatcher:
    """A GGUF transformer (ComfyUI-GGUF's layout): block-quantised weights stay quantised in memory and are
    dequantised per layer per call (nodes.gguf); the file's float tensors are stored in the compute dtype
    (or the weight_dtype asked for), and computed as ComfyUI computes that storage on this device."""
    from ..zimage_core.transformer import load_transformer

    storage = WEIGHT_DTYPES[weight_dtype]
    if storage not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"ZImageModelLoader: {path} is a GGUF file, quantised already; weight_dtype "
                         f"{weight_dtype!r} does not apply to it. Choose weight_dtype 'default' (or bf16/fp16).")
    storage = storage or compute_dtype_for(load_device)
    manual_cast = manual_cast_for(storage, load_device)
    ops = gguf_operations(operations_for(model_config_for({}), storage, manual_cast, load_device))
    diffusion_model = load_explained(
        lambda: load_transformer(path, dtype=storage, device=offload_device, operations=ops,
                                 model_class=ZImageDiffusionModel, layer_loader=GGUFLayerLoader(ops, storage),
                                 **load_options()), path, WHAT, FIX)
    diffusion_model.eval().requires_grad_(False)
    if manual_cast is not None:
        diffusion_model.compute_dtype = manual_cast
    log.info("Z-Image model %s: GGUF, float tensors %s, compute %s, load device %s", path, storage,
             manual_cast or storage, load_device)
    # The classic patcher, as ComfyUI-GGUF's: dynamic VRAM streams only comfy.ops' own weight formats.
    return as_core_model(diffusion_model, storage, manual_cast, load_device, offload_device,
                         patcher=(ClassicPatcher, (GGUFPatching,)))


def as_core_model(diffusion_model: ZImageDiffusionModel, weight_dtype: torch.dtype, manual_cast: torch.dtype | None,
                  load_device: torch.device, offload_device: torch.device,
                  quant_layers: dict[str, dict] | None = None,
                  patcher: tuple[type | None, tuple[type, ...]] = (None, ())) -> comfy.model_patcher.ModelPatcher:
    """Wrap a built ZImageDiffusionModel as a core MODEL: model_base.Lumina2 with supported_models.ZImage
    (marked mixed precision, as ComfyUI's detection marks it, for a comfy_quant file's layers)."""
    model_config = comfy.supported_models.ZImage(_unet_config(diffusion_model))
    if quant_layers:
        set_quant_config(model_config, quant_layers)
    model_config.set_inference_dtype(weight_dtype, manual_cast)
    model = ZImageBaseModel(model_config)
    model.diffusion_model = diffusion_model
    archive_model_dtypes(model.diffusion_model)
    result = make_patcher(model, load_device, offload_device, *patcher)
    if patcher == (None, ()):  # GGUF layers dequantise (and patch) per call: they stay eager
        use_step_graphs(result, load_device)
    return result


def is_zimage_model(model: Any) -> bool:
    """A MODEL whose denoiser is Z-Image-shaped: ours, or ComfyUI's native Z-Image (UNETLoader)."""
    inner = getattr(model, "model", None)
    return isinstance(inner, comfy.model_base.Lumina2) and getattr(inner.latent_format, "latent_channels", 16) == 16
