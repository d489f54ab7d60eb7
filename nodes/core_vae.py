"""The FLUX.1 VAE as ComfyUI's core VAE, with zimage_core's FluxVAE inside.

`comfy.sd.VAE` normally builds its own network from a state dict. `ZImageCoreVAE` sets the same
attributes its FLUX branch sets (16 latent channels, 8× scale, ComfyUI's pixel/latent conventions), with
our FluxVAE as the first-stage model: VAEDecode, VAEDecodeTiled, VAEEncode, VAEEncodeForInpaint and every
other node that takes a VAE run ComfyUI's code on our network. ZImageVAEDecode/Encode reach the FluxVAE
directly for its fused kernels and memory-driven tiling.
"""

from __future__ import annotations

import copy
import logging

import comfy.model_management as mm
import comfy.ops
import comfy.sd
import torch

from ..zimage_core import vae as core_vae
from .comfy_compat import ClassicPatcher
from .core_model import COMPUTE_DTYPES, load_options
from .errors import load_explained

log = logging.getLogger("ComfyUI-ZImage")


def checked_for_decode(raw_latents: torch.Tensor, node: str) -> torch.Tensor:
    """Raw latents about to be decoded, with NaN/inf and wildly out-of-range values fixed and a warning
    (zimage_core.vae.limit_decode_latents has the bound and why); unchanged latents are returned as is."""
    fixed, report = core_vae.limit_decode_latents(raw_latents)
    if report is not None:
        log.warning("%s: the latent to decode had %s", node, report.describe())
    return fixed


class FluxFirstStage(torch.nn.Module):
    """ComfyUI's first-stage-model convention: encode([-1,1] NCHW pixels) → raw latents, decode back."""

    def __init__(self, flux: core_vae.FluxVAE) -> None:
        super().__init__()
        self.flux = flux

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.flux.encode_raw(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        # Core VAEDecode / VAEDecodeTiled on our VAE come here (ZImageVAEDecode checks before).
        return self.flux.decode_raw(checked_for_decode(z, "VAE decode"))


class ZImageCoreVAE(comfy.sd.VAE):
    """A core VAE (comfy.sd.VAE) over zimage_core's FluxVAE."""

    def __init__(self, flux: core_vae.FluxVAE, load_device: torch.device, offload_device: torch.device,
                 dtype: torch.dtype, path: str = "") -> None:
        # The attributes comfy.sd.VAE.__init__ sets for the FLUX autoencoder (0.3.75, 0.18.1 and 0.28.0).
        self.memory_used_encode = flux.memory_used_encode
        self.memory_used_decode = flux.memory_used_decode
        self.downscale_ratio = self.upscale_ratio = flux.config.downscale
        self.latent_channels = flux.config.z_channels
        self.latent_dim = 2
        self.output_channels = 3
        self.pad_channel_value = None
        self.process_input = lambda image: image * 2.0 - 1.0
        # In place and returned: 0.18.1 ignores the return value, 0.3.75 uses it.
        self.process_output = lambda image: image.add_(1.0).div_(2.0).clamp_(0.0, 1.0)
        self.working_dtypes = list(COMPUTE_DTYPES)
        self.disable_offload = False
        self.not_video = False
        self.size = None
        self.downscale_index_formula = self.upscale_index_formula = None
        self.extra_1d_channel = None
        self.crop_input = True
        self.handles_tiling = False  # 0.28: the model tiles itself (VAEDecodeTiled asks)
        self.format_encoded = None  # 0.28: a hook on encoded latents
        self.audio_sample_rate = 44100
        self.first_stage_model = FluxFirstStage(flux).eval()
        self.device = load_device
        self.vae_dtype = dtype
        self.output_device = mm.intermediate_device()
        self.path = path
        self.patcher = ClassicPatcher(self.first_stage_model, load_device=load_device, offload_device=offload_device)
        self.model_size()

    @property
    def flux(self) -> core_vae.FluxVAE:
        return self.first_stage_model.flux

    def with_flux(self, flux: core_vae.FluxVAE) -> ZImageCoreVAE:
        """A new core VAE on another FluxVAE (same devices and dtype), e.g. a fused copy."""
        return ZImageCoreVAE(flux, self.device, self.patcher.offload_device, self.vae_dtype, self.path)

    # -- what ZImageVAEDecode / ZImageVAEEncode add: our memory-driven tiling in zimage_core --
    def _make_room(self, needed: int) -> None:
        # Ask ComfyUI to free what FluxVAE's automatic mode wants for a whole pass (offloading other models'
        # weights) rather than tile. For a decode, our transformer keeps this free (zimage_core.vae.decode_room).
        mm.load_models_gpu([self.patcher], memory_required=core_vae.whole_pass_room(needed))

    def decode_auto(self, raw_latents: torch.Tensor) -> torch.Tensor:
        self._make_room(self.flux.memory_used_decode(tuple(raw_latents[:1].shape)))
        latents = core_vae.normalize_latents(raw_latents.to(self.device, torch.float32))
        return self.flux.decode(latents, check_interrupt=mm.throw_exception_if_processing_interrupted).to(
            mm.intermediate_device(), torch.float32)

    def encode_auto(self, images: torch.Tensor) -> torch.Tensor:
        b, h, w, c = images.shape
        self._make_room(self.flux.memory_used_encode((1, c, h, w)))
        latents = self.flux.encode(images.to(self.device, torch.float32),
                                   check_interrupt=mm.throw_exception_if_processing_interrupted)
        return core_vae.denormalize_latents(latents.float()).to(mm.intermediate_device())


def fused_copy(vae: ZImageCoreVAE) -> ZImageCoreVAE:
    """The same VAE with fused GroupNorm·SiLU kernels, as a new VAE: the given one is left as it was."""
    flux = copy.deepcopy(vae.flux).to(vae.patcher.offload_device)
    return vae.with_flux(flux.fuse_norm_act())


def load_zimage_vae(path: str) -> ZImageCoreVAE:
    load_device = mm.vae_device()
    offload_device = mm.vae_offload_device()
    dtype = mm.vae_dtype(load_device, COMPUTE_DTYPES)
    flux = load_explained(
        lambda: core_vae.load_vae(path, dtype=dtype, device=offload_device, operations=comfy.ops.disable_weight_init,
                                  **load_options()),
        path, "the FLUX.1 VAE used by Z-Image (ae.safetensors)", "Put ae.safetensors in models/vae and select it.")
    flux.eval().requires_grad_(False)
    return ZImageCoreVAE(flux, load_device, offload_device, dtype, path)
