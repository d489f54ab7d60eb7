"""Z-Image as ComfyUI's core MODEL: zimage_core's transformer inside ComfyUI's own Z-Image model class.

ComfyUI's native Z-Image is `model_base.Lumina2` + `supported_models.ZImage` + `NextDiT`. We keep the
first two, so everything ComfyUI keys on them applies unchanged (Flux latent format, shift-3 flow
sampling, memory factor, LoRA key maps including diffusers' split q/k/v onto the fused qkv), and swap
NextDiT for zimage_core's transformer, called the way ComfyUI calls NextDiT. Its parameter names are
ComfyUI's, so `diffusion_model.*` keys are the same as the native model's.

No model math here: only the call convention, ComfyUI's transformer_options (wrappers, block patches,
rope options) mapped onto zimage_core's hooks, and the dtype/device choices of the loader.
"""

from __future__ import annotations

import logging
from typing import Any

import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.supported_models
import torch

from ..zimage_core.transformer import ZImageTransformer
from .errors import load_explained

log = logging.getLogger("ComfyUI-ZImage")

# Z-Image is trained in bf16; fp16 activations overflow (black images), so compute runs in bf16 where
# the device has it and in fp32 otherwise, whatever the storage dtype.
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
# transformer_options key under which a node (ZImageCompileModel's wrapper) hands the transformer a
# zimage_core BlockCall for this call only; the model itself never changes.
BLOCK_CALL_KEY = "zimage_block_call"
# ComfyUI's patcher class: 0.18.1 names the one its loaders use CoreModelPatcher; 0.3.75 has only ModelPatcher.
CorePatcher = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def load_options() -> dict:
    """What every zimage_core loader gets from ComfyUI: its --disable-mmap, and Cancel between tensors."""
    import comfy.cli_args

    return {"mmap": not getattr(comfy.cli_args.args, "disable_mmap", False),
            "check_interrupt": mm.throw_exception_if_processing_interrupted}


def compute_dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32


class _ComfyBlockPatches:
    """zimage_core BlockHooks that run ComfyUI's `noise_refiner` / `double_block` patches with the
    arguments native NextDiT gives them (e.g. ZImageFunControlnet's control patch): image tokens as
    views of the hidden states (patches add to them in place), RoPE in ComfyUI's layout."""

    def __init__(self, patches: dict, transformer_options: dict, total_blocks: int) -> None:
        self.refiner = patches.get("noise_refiner", [])
        self.double = patches.get("double_block", [])
        self.options = transformer_options
        self.options["total_blocks"] = total_blocks
        self.options["block_type"] = "double"

    def after_noise_refiner(self, i, img, img_input, cap, rope, t_emb, x):
        for patch in self.refiner:
            out = patch({"img": img, "img_input": img_input, "txt": cap, "pe": rope, "vec": t_emb, "x": x,
                         "block_index": i, "transformer_options": self.options, "block_type": "noise_refiner"})
            if "img" in out:
                img = out["img"]
        return img

    def after_layer(self, i, seq, seq_input, n_img, rope, t_emb, x):
        self.options["block_index"] = i
        for patch in self.double:
            out = patch({"img": seq[:, :n_img], "img_input": seq_input[:, :n_img], "txt": seq[:, n_img:],
                         "pe": rope[:, :n_img], "vec": t_emb, "x": x, "block_index": i,
                         "transformer_options": self.options})
            if "img" in out:
                seq[:, :n_img] = out["img"]
            if "txt" in out:
                seq[:, n_img:] = out["txt"]
        return seq


def _captions(context: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """ComfyUI's batched text features → one (L_i, D) tensor per sample, batch padding removed."""
    if attention_mask is None:
        return list(context.unbind(0))
    mask = attention_mask.to(context.device).bool()
    return [row[mask[min(i, mask.shape[0] - 1)]] for i, row in enumerate(context.unbind(0))]


def _image_pos(transformer_options: dict) -> tuple[float, float, float, float] | None:
    rope = transformer_options.get("rope_options")
    if not rope:
        return None
    return (float(rope.get("scale_y", 1.0)), float(rope.get("shift_y", 0.0)),
            float(rope.get("scale_x", 1.0)), float(rope.get("shift_x", 0.0)))


class ZImageDiffusionModel(ZImageTransformer):
    """zimage_core's transformer with NextDiT's call convention (ComfyUI's `diffusion_model`).

    `forward(x, timesteps, context, num_tokens, attention_mask, transformer_options=...)`: timesteps
    are ComfyUI's flow timesteps (sigma × multiplier 1.0); returns the velocity, as NextDiT does.
    """

    def forward(self, x, timesteps, context, num_tokens=None, attention_mask=None, **kwargs):
        wrappers = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                             kwargs.get("transformer_options", {}))
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._comfy_forward, self, wrappers).execute(x, timesteps, context, num_tokens, attention_mask, **kwargs)

    def _comfy_forward(self, x, timesteps, context, num_tokens=None, attention_mask=None,
                       transformer_options: dict | None = None, **kwargs: Any) -> torch.Tensor:
        options = transformer_options if transformer_options is not None else {}
        if kwargs.get("ref_latents") or kwargs.get("siglip_feats"):
            raise ValueError("Z-Image Omni reference images (TextEncodeZImageOmni) need the Omni model, which "
                             "this pack's loader does not build. Load the Omni checkpoint with UNETLoader.")
        patches = options.get("patches", {})
        hooks = None
        if patches.get("noise_refiner") or patches.get("double_block"):
            hooks = _ComfyBlockPatches(patches, options, len(self.layers))
        return ZImageTransformer.forward(self, x, timesteps, _captions(context, attention_mask), hooks=hooks,
                                         block_call=options.get(BLOCK_CALL_KEY), image_pos=_image_pos(options))


def _unet_config(model: ZImageTransformer) -> dict:
    """ComfyUI's unet_config for this transformer (what model detection would produce for the file)."""
    cfg = model.config
    return {
        "image_model": "lumina2", "dim": cfg.dim, "n_layers": cfg.n_layers, "n_refiner_layers": cfg.n_refiner_layers,
        "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "in_channels": cfg.in_channels,
        "patch_size": cfg.patch_size, "cap_feat_dim": cfg.cap_feat_dim, "axes_dims": list(cfg.axes_dims),
        "axes_lens": list(cfg.axes_lens), "rope_theta": cfg.rope_theta, "qk_norm": True, "z_image_modulation": True,
        "pad_tokens_multiple": 32, "time_scale": cfg.t_scale,
        # The diffusion model is ours, built by zimage_core; ComfyUI must not build a NextDiT.
        "disable_unet_model_creation": True,
    }


def load_zimage_model(path: str, weight_dtype: str) -> comfy.model_patcher.ModelPatcher:
    """A core MODEL (ModelPatcher over model_base.Lumina2) whose diffusion model is zimage_core's."""
    from ..zimage_core.transformer import load_transformer

    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    compute = compute_dtype_for(load_device)
    storage = WEIGHT_DTYPES[weight_dtype]
    fp8_attention = storage == "fp8_matmul_attention"
    fp8_matmul = storage in ("fp8_matmul", "fp8_matmul_attention")
    if fp8_matmul:
        storage = compute  # quantized after loading; the small layers stay in the compute dtype
    if storage is None:
        # "default": what ComfyUI picks for this device (respects --bf16-unet, --fp8_e4m3fn-unet ...).
        storage = mm.unet_dtype(load_device, supported_dtypes=COMPUTE_DTYPES)
    if storage in COMPUTE_DTYPES:
        compute = storage
    manual_cast = None if storage == compute else compute
    ops = comfy.ops.disable_weight_init if manual_cast is None else comfy.ops.manual_cast
    diffusion_model = load_explained(
        lambda: load_transformer(path, dtype=storage, device=offload_device, operations=ops,
                                 model_class=ZImageDiffusionModel, **load_options()), path,
        "a Z-Image-Turbo diffusion model (e.g. z_image_turbo_bf16.safetensors)",
        "Put the Z-Image transformer file in models/diffusion_models and select it.")
    diffusion_model.eval().requires_grad_(False)
    if fp8_matmul:
        diffusion_model.quantize_fp8()
    if fp8_attention:
        diffusion_model.set_fp8_attention(True)
    if manual_cast is not None:
        diffusion_model.compute_dtype = compute  # e.g. fp8/fp16 storage computed in bf16 (fp32 on the CPU)

    log.info("Z-Image model %s: weights %s, compute %s, load device %s", path, storage, compute, load_device)
    return as_core_model(diffusion_model, storage, manual_cast, load_device, offload_device)


def as_core_model(diffusion_model: ZImageDiffusionModel, weight_dtype: torch.dtype, manual_cast: torch.dtype | None,
                  load_device: torch.device, offload_device: torch.device) -> comfy.model_patcher.ModelPatcher:
    """Wrap a built ZImageDiffusionModel as a core MODEL: model_base.Lumina2 with supported_models.ZImage."""
    model_config = comfy.supported_models.ZImage(_unet_config(diffusion_model))
    model_config.set_inference_dtype(weight_dtype, manual_cast)
    model = comfy.model_base.Lumina2(model_config)
    model.diffusion_model = diffusion_model
    if hasattr(mm, "archive_model_dtypes"):  # 0.18.1: records each weight's dtype for dynamic loading
        mm.archive_model_dtypes(model.diffusion_model)
    return CorePatcher(model, load_device=load_device, offload_device=offload_device)


def is_zimage_model(model: Any) -> bool:
    """A MODEL whose denoiser is Z-Image-shaped: ours, or ComfyUI's native Z-Image (UNETLoader)."""
    inner = getattr(model, "model", None)
    return isinstance(inner, comfy.model_base.Lumina2) and getattr(inner.latent_format, "latent_channels", 16) == 16
