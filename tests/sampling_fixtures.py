"""Tiny random Z-Image models and the diffusers reference pipelines for the sampler tests.

The sampler under test talks to a Denoiser: model(x, sigma (B,), cap_feats list) -> v = ε − x0.
`make_denoiser` builds that Denoiser from a diffusers ZImageTransformer2DModel: by default our own
zimage_core transformer loaded from the diffusers model's saved weights, so the parity tests check
sampler + transformer end to end against the diffusers pipelines. ZIMAGE_TEST_DENOISER=diffusers
wraps the diffusers model itself (DiffusersDenoiser) to isolate the sampler when debugging.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    ZImageImg2ImgPipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.pipelines.z_image.pipeline_z_image_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor

USE_ZIMAGE_TRANSFORMER = os.environ.get("ZIMAGE_TEST_DENOISER", "zimage") == "zimage"

CAP_DIM = 32
LATENT_CHANNELS = 16

# dim 64 / 2 heads → head_dim 32 = sum(axes_dims); axes_lens cover caption positions and an 8×8 latent.
TINY_TRANSFORMER_CONFIG = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=LATENT_CHANNELS,
    dim=64,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=CAP_DIM,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[8, 12, 12],
    axes_lens=[256, 32, 32],
)


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """All parameters N(0, std): zero-initialised parts (pad tokens, adaLN) must matter too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def build_diffusers_transformer(seed: int = 0) -> ZImageTransformer2DModel:
    model = ZImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    _randomize(model, seed)
    return model.eval()


def build_flux_vae(seed: int = 1) -> AutoencoderKL:
    """A tiny AutoencoderKL with the FLUX layout (16 latent channels, no quant convs, FLUX scale/shift)."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    _randomize(vae, seed, std=0.05)
    return vae.eval()


def zimage_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler as configured by Tongyi-MAI/Z-Image-Turbo's scheduler/scheduler_config.json."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def diffusers_sigma_to_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """What ZImagePipeline hands the transformer as `t` for a step at σ.

    The scheduler's timestep is σ·1000 (float32); the pipeline passes (1000 − timestep)/1000, i.e. t = 1 − σ
    (0 = pure noise, 1 = clean), and the transformer embeds t·t_scale (t_scale = 1000).
    """
    return (1000 - sigma.float() * 1000) / 1000


class DiffusersDenoiser:
    """Adapts diffusers' ZImageTransformer2DModel to the Denoiser protocol exactly as ZImagePipeline calls it.

    Latents go in as a list of (C, 1, H, W), t = 1 − σ (pipeline arithmetic), and the raw output
    (x0 − ε) is negated into the velocity v = ε − x0.
    """

    def __init__(self, transformer: ZImageTransformer2DModel) -> None:
        self.transformer = transformer

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cap_feats: list[torch.Tensor]) -> torch.Tensor:
        t = diffusers_sigma_to_timestep(sigma)
        out = self.transformer(list(x.unsqueeze(2).unbind(0)), t, list(cap_feats), return_dict=False)[0]
        return -torch.stack(out, dim=0).squeeze(2)


def make_denoiser(transformer: ZImageTransformer2DModel, workdir: str | Path | None = None):
    """The Denoiser the sampler tests run: the diffusers model itself, or our transformer on its weights."""
    if USE_ZIMAGE_TRANSFORMER:
        from zimage_core import load_transformer

        if workdir is None:  # the loaded model owns its weights, so the files can go right away
            with tempfile.TemporaryDirectory(prefix="zimage-sampler-") as tmp:
                return make_denoiser(transformer, tmp)
        folder = Path(workdir) / "transformer"
        transformer.save_pretrained(folder, safe_serialization=True)
        return load_transformer(folder, dtype=transformer.dtype)
    return DiffusersDenoiser(transformer)


def text_to_image_pipeline(transformer: ZImageTransformer2DModel) -> ZImagePipeline:
    # No text encoder, tokenizer or VAE: the tests pass prompt_embeds/latents and ask for latents back.
    return ZImagePipeline(
        scheduler=zimage_scheduler(), vae=None, text_encoder=None, tokenizer=None, transformer=transformer
    )


def img2img_pipeline(transformer: ZImageTransformer2DModel, vae: AutoencoderKL) -> ZImageImg2ImgPipeline:
    return ZImageImg2ImgPipeline(
        scheduler=zimage_scheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )


def img2img_inputs_like_pipeline(
    pipe: ZImageImg2ImgPipeline, image: torch.Tensor, seed: int, batch: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z0, noise) exactly as ZImageImg2ImgPipeline derives them from `image` and a generator seeded `seed`.

    Mirrors its prepare_latents: preprocess, VAE encode (posterior sample, first use of the generator),
    (z − shift)·scale, then randn noise from the same generator.
    """
    gen = torch.Generator().manual_seed(seed)
    init = pipe.image_processor.preprocess(image).to(torch.float32)
    with torch.no_grad():
        z = retrieve_latents(pipe.vae.encode(init), generator=gen)
    z0 = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    if batch > z0.shape[0]:
        z0 = torch.cat([z0] * (batch // z0.shape[0]), dim=0)
    noise = randn_tensor((batch, *z0.shape[1:]), generator=gen, dtype=torch.float32)
    return z0, noise


def caption_feats(lengths: list[int], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, CAP_DIM, generator=gen) for n in lengths]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a.double() - b.double()).norm() / b.double().norm())
