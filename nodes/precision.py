"""The dtype and operations policy of our models inside ComfyUI: what the weights are stored in, what the
math runs in, and which layer classes (ComfyUI's operations) the transformer is built with.

Z-Image is trained in bf16; fp16 activations overflow (black images), so the transformer computes in bf16
where the device has it and in fp32 otherwise, whatever the storage dtype, as ComfyUI's supported_models.ZImage
allows. The layer classes are the ones ComfyUI itself would pick for the model (`comfy.ops.pick_operations`:
manual cast, its `--fast` fp8 matmuls, custom operations of other packs), so they reach our layers too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import comfy.model_management as mm
import comfy.ops
import torch

COMPUTE_DTYPES = [torch.bfloat16, torch.float32]
WEIGHT_DTYPES = {
    "default": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    # fp8 tensor-core matmuls (Ada/Hopper): block weights quantized per row by zimage_core.
    "fp8_e4m3fn_fast": "fp8_matmul",
    # ... and attention through fp8 q/k/v (zimage_core fp8_attention: a Triton kernel on Ada/Hopper).
    "fp8_e4m3fn_fast_attention": "fp8_matmul_attention",
}


def compute_dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32


def manual_cast_for(storage: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The dtype the transformer computes in when it differs from the storage dtype (None: compute in the
    storage dtype): ComfyUI's own rule (comfy.model_management.unet_manual_cast; e.g. bf16 weights compute in
    fp32 on the CPU), except that fp16 never computes in fp16."""
    manual_cast = mm.unet_manual_cast(storage, device, COMPUTE_DTYPES)
    if manual_cast is None and storage not in COMPUTE_DTYPES:
        manual_cast = compute_dtype_for(device)
    return manual_cast


def operations_for(model_config: Any, storage: torch.dtype, manual_cast: torch.dtype | None,
                   load_device: torch.device) -> Any:
    """The operations ComfyUI's BaseModel would build this model with (model_config.custom_operations, else
    comfy.ops.pick_operations with the config's fp8 optimisation flag and --fast)."""
    custom = getattr(model_config, "custom_operations", None)
    if custom is not None:
        return custom
    fp8 = getattr(model_config, "optimizations", {}).get("fp8", False)
    return comfy.ops.pick_operations(storage, manual_cast, load_device=load_device, fp8_optimizations=fp8,
                                     model_config=model_config)


@contextlib.contextmanager
def fp32_compute(diffusion_model: torch.nn.Module) -> Iterator[None]:
    """Run a Z-Image diffusion model (ours or ComfyUI's NextDiT) in float32 for the calls inside the block,
    whatever its weights are stored in: ComfyUI's layers cast their weights to the input's dtype
    (comfy_cast_weights, as for partly loaded models) and ours computes in compute_dtype. Every flag is
    restored afterwards, so the model is left as it was."""
    layers = [(m, m.comfy_cast_weights) for m in diffusion_model.modules() if hasattr(m, "comfy_cast_weights")]
    has_compute_dtype = hasattr(diffusion_model, "compute_dtype")
    compute_dtype = getattr(diffusion_model, "compute_dtype", None)
    try:
        for m, _ in layers:
            m.comfy_cast_weights = True
        if has_compute_dtype:
            diffusion_model.compute_dtype = torch.float32
        yield
    finally:
        for m, flag in layers:
            m.comfy_cast_weights = flag
        if has_compute_dtype:
            diffusion_model.compute_dtype = compute_dtype
