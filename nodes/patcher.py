"""ComfyUI model-management glue: the objects our loaders return (ZIMAGE_MODEL / _TEXT_ENCODER / _VAE).

Each wraps a zimage_core module in `comfy.model_patcher.ModelPatcher` with ComfyUI's load and offload
devices, so `comfy.model_management.load_models_gpu` decides what stays on the GPU: loading the DiT
evicts the text encoder when room is short, `--lowvram` streams the DiT's `comfy.ops` layers, and a
second run re-uses what is already loaded. No model math lives here: only dtype/device choices,
memory estimates and calls into zimage_core.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import torch

from ..zimage_core import vae as core_vae
from ..zimage_core.errors import CheckpointError

log = logging.getLogger("ComfyUI-ZImage")
T = TypeVar("T")

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
}


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32


class _Holder(torch.nn.Module):
    """Container for modules with a read-only `device` property (transformers models, FluxVAE):
    ModelPatcher records the current device as `model.device`. Moving the holder moves the module."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner


def _wrap(module: torch.nn.Module, load_device, offload_device) -> comfy.model_patcher.ModelPatcher:
    if isinstance(getattr(type(module), "device", None), property):
        module = _Holder(module)
    return comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)


def _load_explained(load: Callable[[], T], path: str, what: str, fix: str) -> T:
    """Run a zimage_core loader. It raises CheckpointError for files it recognises as wrong; anything
    else from deep inside loading still becomes one clear message naming the file and the fix."""
    try:
        return load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - turned into one clear message
        raise CheckpointError(path, what, f"a file that could not be loaded ({type(e).__name__}: {e})", fix) from e


@dataclass
class ZImageModel:
    """ZIMAGE_MODEL: the S3-DiT in a ModelPatcher plus the dtype it computes in."""

    patcher: comfy.model_patcher.ModelPatcher
    module: torch.nn.Module  # the ZImageTransformer inside the patcher
    compute_dtype: torch.dtype
    path: str

    def memory_estimate(self, latent_shape: tuple[int, ...], caption_tokens: int, passes: int = 1) -> int:
        """Bytes of activations one denoiser call needs at this size (weights are counted by ComfyUI).

        Per token the widest live tensors in a block are the SwiGLU hidden (2 × ffn) and q/k/v/out
        (4 × dim); attention itself runs through SDPA without materialising the score matrix.
        """
        cfg = getattr(self.module, "config", None)
        dim = getattr(cfg, "dim", 3840)
        ffn = getattr(cfg, "ffn_hidden", int(dim / 3 * 8))
        b, _, h, w = latent_shape
        image_tokens = math.ceil((h // 2) * (w // 2) / 32) * 32
        tokens = image_tokens + math.ceil(caption_tokens / 32) * 32
        per_token = (4 * dim + 3 * ffn) * mm.dtype_size(self.compute_dtype)
        return int(b * passes * tokens * per_token * 1.5) + 64 * 1024 * 1024

    def load(self, latent_shape: tuple[int, ...], caption_tokens: int, passes: int = 1) -> None:
        mm.load_models_gpu([self.patcher], memory_required=self.memory_estimate(latent_shape, caption_tokens, passes))

    def denoiser(self) -> _Denoiser:
        return _Denoiser(self.module, self.patcher.load_device, self.compute_dtype)


class _Denoiser:
    """A zimage_core Denoiser on ComfyUI's load device. `device`/`dtype` tell zimage_core's sampler
    where to run (it keeps its state in float32, as ComfyUI does, and feeds the network `dtype`)."""

    def __init__(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.module, self.device, self.dtype = module, device, dtype

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cap_feats: list[torch.Tensor]) -> torch.Tensor:
        out = self.module(x.to(self.device, self.dtype), sigma.to(self.device, torch.float32),
                          [c.to(self.device, self.dtype) for c in cap_feats])
        return out.to(x.dtype)


def load_zimage_model(path: str, weight_dtype: str) -> ZImageModel:
    from ..zimage_core.transformer_loading import load_transformer

    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    compute = _compute_dtype(load_device)
    storage = WEIGHT_DTYPES[weight_dtype]
    fp8_matmul = storage == "fp8_matmul"
    if fp8_matmul:
        storage = compute  # quantized after loading; the small layers stay in the compute dtype
    if storage is None:
        # "default": what ComfyUI picks for this device (respects --bf16-unet, --fp8_e4m3fn-unet ...).
        storage = mm.unet_dtype(load_device, supported_dtypes=COMPUTE_DTYPES)
    if storage in COMPUTE_DTYPES:
        compute = storage
    ops = comfy.ops.disable_weight_init if storage == compute else comfy.ops.manual_cast
    model = _load_explained(
        lambda: load_transformer(path, dtype=storage, device=offload_device, operations=ops), path,
        "a Z-Image-Turbo diffusion model (e.g. z_image_turbo_bf16.safetensors)",
        "Put the Z-Image transformer file in models/diffusion_models and select it.")
    model.eval().requires_grad_(False)
    if fp8_matmul:
        model.quantize_fp8()
    if storage != compute:
        model.compute_dtype = compute  # e.g. fp8/fp16 storage computed in bf16 (or fp32 on the CPU)
    log.info("Z-Image model %s: weights %s, compute %s, load device %s", path, storage, compute, load_device)
    return ZImageModel(_wrap(model, load_device, offload_device), model, compute, path)


@dataclass
class ZImageTextEncoderHandle:
    """ZIMAGE_TEXT_ENCODER: zimage_core's Qwen3 text encoder whose module lives in a ModelPatcher."""

    encoder: object
    patcher: comfy.model_patcher.ModelPatcher
    path: str

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        tokens = sum(len(p) for p in prompts) + 32 * len(prompts)  # chars bound the token count from above
        cfg = getattr(self.encoder.model, "config", None)
        hidden = getattr(cfg, "hidden_size", 2560)
        inter = getattr(cfg, "intermediate_size", 9728)
        dtype_size = mm.dtype_size(next(self.encoder.model.parameters()).dtype)
        # Whole model: the transformers Qwen3 layers are not comfy.ops layers, so they cannot be streamed
        # (under --lowvram ComfyUI's text_encoder_device() is the CPU anyway).
        mm.load_models_gpu([self.patcher], memory_required=tokens * (4 * hidden + 3 * inter) * dtype_size * 2,
                           force_full_load=True)
        feats = self.encoder.encode(prompts)
        # Hand the features to ComfyUI's intermediate device in fp32 so CONDITIONING is device-neutral.
        return [f.to(mm.intermediate_device(), torch.float32) for f in feats]


def load_zimage_text_encoder(path: str) -> ZImageTextEncoderHandle:
    from ..zimage_core.text_encoder import load_text_encoder

    load_device = mm.text_encoder_device()
    offload_device = mm.text_encoder_offload_device()
    # Qwen3 is trained in bf16. On the CPU (also ComfyUI's text-encoder device under --lowvram) bf16
    # halves the 16 GB an fp32 copy of the 4B model would take; GPUs without bf16 compute in fp32.
    dtype = torch.bfloat16 if mm.is_device_cpu(load_device) else _compute_dtype(load_device)
    encoder = _load_explained(
        lambda: load_text_encoder(path, dtype=dtype, device=offload_device), path,
        "the Qwen3-4B text encoder of Z-Image (qwen_3_4b.safetensors)",
        "Put qwen_3_4b.safetensors in models/text_encoders and select it.")
    encoder.model.eval().requires_grad_(False)
    patcher = _wrap(encoder.model, load_device, offload_device)
    return ZImageTextEncoderHandle(encoder, patcher, path)


@dataclass
class ZImageVAEHandle:
    """ZIMAGE_VAE: the FLUX autoencoder in a ModelPatcher. Works on ComfyUI's RAW latents (the
    LATENT convention for Flux-family models) and converts to/from zimage_core's normalized ones."""

    vae: torch.nn.Module
    patcher: comfy.model_patcher.ModelPatcher
    dtype: torch.dtype
    path: str

    def decode(self, raw_latents: torch.Tensor) -> torch.Tensor:
        mm.load_models_gpu([self.patcher], memory_required=self.vae.memory_used_decode(tuple(raw_latents.shape)))
        latents = core_vae.normalize_latents(raw_latents.to(self.patcher.load_device, torch.float32))
        images = self.vae.decode(latents)
        return images.to(mm.intermediate_device(), torch.float32)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        b, h, w, c = images.shape
        mm.load_models_gpu([self.patcher], memory_required=self.vae.memory_used_encode((b, c, h, w)))
        latents = self.vae.encode(images.to(self.patcher.load_device, torch.float32))
        return core_vae.denormalize_latents(latents.float()).to(mm.intermediate_device())


def load_zimage_vae(path: str) -> ZImageVAEHandle:
    load_device = mm.vae_device()
    offload_device = mm.vae_offload_device()
    dtype = mm.vae_dtype(load_device, COMPUTE_DTYPES)
    vae = _load_explained(
        lambda: core_vae.load_vae(path, dtype=dtype, device=offload_device, operations=comfy.ops.disable_weight_init),
        path, "the FLUX.1 VAE used by Z-Image (ae.safetensors)", "Put ae.safetensors in models/vae and select it.")
    vae.eval().requires_grad_(False)
    return ZImageVAEHandle(vae, _wrap(vae, load_device, offload_device), dtype, path)
