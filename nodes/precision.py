"""The dtype and operations policy of our models inside ComfyUI: what the weights are stored in, what the
math runs in, and which layer classes (ComfyUI's operations) the transformer is built with.

Z-Image is trained in bf16; fp16 activations overflow (black images), so the transformer computes in bf16
where the device has it and in fp32 otherwise, whatever the storage dtype, as ComfyUI's supported_models.ZImage
allows. The layer classes are the ones ComfyUI itself would pick for the model (`comfy.ops.pick_operations`:
manual cast, its `--fast` fp8 matmuls, custom operations of other packs), so they reach our layers too.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import comfy.model_management as mm
import comfy.ops
import torch

from .comfy_compat import is_mixed_precision_ops, layers_read_comfy_quant, quant_formats, set_quant_config

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


def quantized_manual_cast(device: torch.device) -> torch.dtype | None:
    """The compute dtype of a comfy_quant (mixed-precision) model: ComfyUI's rule for such files
    (comfy.sd.load_diffusion_model_state_dict: unet_manual_cast with no weight dtype; bf16 on GPUs that have
    it, fp32 on the CPU)."""
    return mm.unet_manual_cast(None, device, COMPUTE_DTYPES)


def model_config_for(quant_layers: dict[str, dict]) -> Any:
    """ComfyUI's Z-Image model config as its model detection would make it for the file: with the file's
    comfy_quant layers (mixed precision), ComfyUI's mixed-precision operations are picked for it."""
    import comfy.supported_models

    model_config = comfy.supported_models.ZImage({"image_model": "lumina2"})
    if quant_layers:
        set_quant_config(model_config, quant_layers)
    return model_config


class ComfyLayerLoader:
    """zimage_core's LayerLoader for ComfyUI's mixed-precision operations: each Linear reads its tensors
    through its own `_load_from_state_dict`, as in ComfyUI's BaseModel.load_model_weights, so quantized
    weights stay ComfyUI QuantizedTensors (fp8 matmuls where the device has them, dequantized otherwise)
    and the others are stored in the compute dtype, as ComfyUI stores them."""

    def __init__(self, operations: Any) -> None:
        self.linear = operations.Linear
        self.comfy_quant_tensors = layers_read_comfy_quant()
        self.formats = quant_formats()

    @classmethod
    def for_operations(cls, operations: Any) -> ComfyLayerLoader | None:
        """The loader for these operations, or None where they are not ComfyUI's mixed-precision ones (e.g.
        another pack's custom operations: the file's quantized weights are then dequantized)."""
        return cls(operations) if is_mixed_precision_ops(operations) else None

    def handles(self, module: torch.nn.Module) -> bool:
        return isinstance(module, self.linear)

    def load(self, module: torch.nn.Module, name: str, tensors: dict[str, torch.Tensor], quant: dict | None,
             device: torch.device | str) -> None:
        prefix = name + "."
        sd = {prefix + k: v for k, v in tensors.items()}
        bias = getattr(module, "bias", None)
        if bias is not None and prefix + "bias" in sd:
            sd[prefix + "bias"] = sd[prefix + "bias"].to(bias.dtype)  # assigned below: in the layer's dtype
        if quant is not None and self.comfy_quant_tensors:
            sd[prefix + "comfy_quant"] = torch.tensor(list(json.dumps(quant).encode("utf-8")), dtype=torch.uint8)
        # Built on the meta device; the layer creates its weight where its factory_kwargs say.
        module.factory_kwargs["device"] = device
        missing: list[str] = []
        unexpected: list[str] = []
        errors: list[str] = []
        module._load_from_state_dict(sd, prefix, {"assign_to_params_buffers": True}, True, missing, unexpected,
                                     errors)
        if errors or missing or getattr(module, "weight", None) is None:
            raise ValueError("; ".join(errors) or f"missing {missing or ['weight']}")


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
