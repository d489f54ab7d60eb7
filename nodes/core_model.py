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

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.supported_models
import torch

from ..zimage_core.accel import prefetch_offloaded
from ..zimage_core.transformer import ZImageTransformer
from ..zimage_core.vae import decode_room
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

    def after_noise_refiner(self, i, img, img_input, cap, layout, t_emb, x):
        for patch in self.refiner:
            out = patch({"img": img, "img_input": img_input, "txt": cap, "pe": layout.image.rope, "vec": t_emb, "x": x,
                         "block_index": i, "transformer_options": self.options, "block_type": "noise_refiner"})
            if "img" in out:
                img = out["img"]
        return img

    def after_layer(self, i, seq, seq_input, layout, t_emb, x):
        self.options["block_index"] = i
        t, cap = layout.target, layout.caption_start
        for patch in self.double:
            out = patch({"img": seq[:, t.start:t.stop], "img_input": seq_input[:, t.start:t.stop],
                         "txt": seq[:, cap:], "pe": layout.joint.rope[:, t.start:t.stop], "vec": t_emb, "x": x,
                         "block_index": i, "transformer_options": self.options})
            if "img" in out:
                seq[:, t.start:t.stop] = out["img"]
            if "txt" in out:
                seq[:, cap:] = out["txt"]
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

    # Copy the block weights that ComfyUI's partial loading left in host memory blocks ahead (see
    # _prefetch_offloaded_blocks); False leaves the copies to ComfyUI's per-layer cast.
    prefetch_offloaded = True

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

        def call() -> torch.Tensor:
            return ZImageTransformer.forward(self, x, timesteps, _captions(context, attention_mask), hooks=hooks,
                                             block_call=options.get(BLOCK_CALL_KEY), image_pos=_image_pos(options))

        prefetch = _prefetch_offloaded_blocks(self, x.device)
        if prefetch is None:
            return call()
        try:
            with prefetch:
                return call()
        except torch.OutOfMemoryError:
            # The copy slots are memory ComfyUI's plan does not know of (its own per-layer copies need less):
            # on a card that tight, finish the step, and the job, with ComfyUI's copies instead.
            self.prefetch_offloaded = False
            log.warning("Z-Image: out of GPU memory with prefetched weights; using ComfyUI's per-layer weight "
                        "copies for this model from now on (slower, same result).")
        return call()

    def blocks_in_call_order(self) -> list[torch.nn.Module]:
        return [*self.context_refiner, *self.noise_refiner, *self.layers]


def _prefetch_offloaded_blocks(model: ZImageDiffusionModel,
                               device: torch.device) -> contextlib.AbstractContextManager | None:
    """When ComfyUI's partial loading (a card that cannot hold the model) left block weights in host memory,
    copy them to the GPU blocks ahead. ComfyUI's own cast copies each layer's weights when the layer runs,
    after everything queued before it, so no copy overlaps compute. None where there is nothing to do, and
    under 0.18.1's dynamic VRAM, whose layers (`_v`) manage their own copies."""
    blocks = model.blocks_in_call_order()
    if not model.prefetch_offloaded or device.type != "cuda" or any(hasattr(m, "_v") for b in blocks for m in b.modules()):
        return None
    return prefetch_offloaded(blocks, device, select=lambda t: t.device.type == "cpu")


class ZImageBaseModel(comfy.model_base.Lumina2):
    """ComfyUI's model class for Z-Image (model_base.Lumina2), whose memory estimate also covers the VAE
    decode that follows sampling.

    On a card that cannot hold the whole transformer, ComfyUI loads as much of it as the estimate leaves
    room for. Without the decode in it, the decode then unloads part of the transformer, and the next prompt
    loads it again (1.4-1.7 s per image at 8 and 12 GiB on an H200)."""

    def memory_required(self, input_shape, *args, **kwargs):
        need = super().memory_required(input_shape, *args, **kwargs)
        dtype = self.manual_cast_dtype or self.get_dtype()
        return max(need, decode_room(input_shape, dtype))


def _spread_offload(loading: list[tuple], blocks: list[torch.nn.Module]) -> list[tuple]:
    """ComfyUI's `_load_list`, with equal-size block layers ordered so that those it leaves in host memory
    (the last in its descending order) are one kind at a time across all blocks (e.g. every block's w1)
    rather than all layers of a few blocks: each block then waits for a share of the copies that the
    compute of the blocks before it hides. The sort key grows by under 1 KiB: the memory plan is unchanged."""
    if not loading or isinstance(loading[0][0], bool):  # 0.18.1's dynamic-VRAM list is ordered otherwise
        return loading
    kinds: dict[str, int] = {}
    rank: dict[int, tuple[str, int]] = {}
    for i, b in enumerate(blocks):
        for name, m in b.named_modules():
            if hasattr(m, "comfy_cast_weights"):
                rank[id(m)] = (name, i)
                kinds.setdefault(name, len(kinds))
    n = len(blocks)
    out = []
    for item in loading:
        key = rank.get(id(item[3]))
        if key is not None:
            item = (item[0] + kinds[key[0]] * n + key[1], *item[1:])
        out.append(item)
    return out


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
    model = ZImageBaseModel(model_config)
    model.diffusion_model = diffusion_model
    if hasattr(mm, "archive_model_dtypes"):  # 0.18.1: records each weight's dtype for dynamic loading
        mm.archive_model_dtypes(model.diffusion_model)
    return _patcher_class()(model, load_device=load_device, offload_device=offload_device)


class _PartialLoading:
    """Patcher mixin for a transformer that does not fit on the card (ComfyUI's partial loading). Clones keep
    the class (ModelPatcher.clone uses self.__class__); 0.18.1's dynamic-VRAM patcher is left as it is.

    - The layers left in host memory are spread over the blocks (see _spread_offload).
    - Loading the partly loaded model again (every prompt) with `extra_memory` more loads that much more.
      ComfyUI's `load` takes its cast buffer out of the budget again, so it would load `extra_memory − buffer`
      more; when that is negative it marks layers that were loaded as offloaded without moving them: they
      stay on the GPU, uncounted, and every later prompt finds that much less free memory (measured: 140 MB
      less per prompt at 12 GiB)."""

    def _load_list(self, *args, **kwargs):
        loading = super()._load_list(*args, **kwargs)
        dm = getattr(self.model, "diffusion_model", None)
        if not isinstance(dm, ZImageDiffusionModel):
            return loading
        return _spread_offload(loading, dm.blocks_in_call_order())

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        m = self.model
        buffer = getattr(m, "model_offload_buffer_memory", 0)
        if (extra_memory >= 0 and getattr(m, "model_lowvram", False) and not force_patch_weights
                and m.current_weight_patches_uuid == self.patches_uuid
                and m.model_loaded_weight_memory + extra_memory + buffer < self.model_size()):
            extra_memory += buffer + 1  # the buffer is reserved already; +1: `load` tests with a strict <
        return super().partially_load(device_to, extra_memory, force_patch_weights=force_patch_weights)


_PATCHERS: dict[type, type] = {}


def _patcher_class() -> type:
    # 0.18.1 swaps CoreModelPatcher for its dynamic-VRAM patcher at startup: read it when a model is built.
    base = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    if base not in _PATCHERS:
        _PATCHERS[base] = type("ZImageModelPatcher", (_PartialLoading, base), {})
    return _PATCHERS[base]


def is_zimage_model(model: Any) -> bool:
    """A MODEL whose denoiser is Z-Image-shaped: ours, or ComfyUI's native Z-Image (UNETLoader)."""
    inner = getattr(model, "model", None)
    return isinstance(inner, comfy.model_base.Lumina2) and getattr(inner.latent_format, "latent_channels", 16) == 16


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
