"""Our transformer with ComfyUI NextDiT's call convention: the adapter ComfyUI's model_base.Lumina2 calls.

No model math here: ComfyUI's arguments (timesteps, context and attention mask, Omni's `ref_latents` /
`ref_contexts` / `siglip_feats`) and its transformer_options (DIFFUSION_MODEL wrappers, block patches, rope
options, attention overrides) are mapped onto zimage_core's forward, hooks, runner and attention dispatch.
"""

from __future__ import annotations

import logging
from typing import Any

import comfy.model_management as mm
import comfy.patcher_extension
import torch

from ..zimage_core.controlnet.model import control_mask
from ..zimage_core.transformer import OmniInputs, SequenceLayout, ZImageTransformer, use_backend
from .memory import prefetch_context

log = logging.getLogger("ComfyUI-ZImage")

# transformer_options key under which a node (ZImageCompileModel's wrapper) hands the transformer a
# zimage_core BlockCall for this call only; the model itself never changes.
BLOCK_CALL_KEY = "zimage_block_call"
# transformer_options key of the Omni layout to follow: "comfyui" (default, as ComfyUI's own model) or "diffusers".
OMNI_REFERENCE_KEY = "zimage_omni_reference"
# OUTER_SAMPLE wrapper key: frees the transformer's CUDA graphs when a sampling run ends.
GRAPHS_KEY = "zimage_cuda_graphs"


def _release_graphs(executor, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - ComfyUI wrapper
    from ..zimage_core.accel import graphs

    try:
        return executor(*args, **kwargs)
    finally:
        model = executor.class_obj.model_patcher.get_model_object("diffusion_model")
        if getattr(model, "cuda_graphs", None) is not None and not graphs.KEEP:
            model.cuda_graphs.clear()  # a graph holds its step's activation memory: not past the sampler


def use_step_graphs(patcher: Any, load_device: torch.device) -> None:
    """Replay each denoising step as a CUDA graph (zimage_core.accel.graphs) on a CUDA load device, unless
    ZIMAGE_CUDA_GRAPHS=0; the graphs are freed when each sampling run ends. Steps that cannot be captured
    (ControlNet patches, compiled blocks, offloaded or per-call cast weights, attention overrides) run as before."""
    from ..zimage_core.accel import graphs

    if not graphs.ENABLED or torch.device(load_device).type != "cuda":
        return
    patcher.get_model_object("diffusion_model").use_cuda_graphs()
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, GRAPHS_KEY, _release_graphs)


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

    def after_noise_refiner(self, i: int, img: torch.Tensor, img_input: torch.Tensor, cap: torch.Tensor,
                            layout: SequenceLayout, t_emb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for patch in self.refiner:
            out = patch({"img": img, "img_input": img_input, "txt": cap, "pe": layout.image.rope, "vec": t_emb,
                         "x": x, "block_index": i, "transformer_options": self.options,
                         "block_type": "noise_refiner"})
            if "img" in out:
                img = out["img"]
        return img

    def after_layer(self, i: int, seq: torch.Tensor, seq_input: torch.Tensor, layout: SequenceLayout,
                    t_emb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.options["block_index"] = i
        t, cap = layout.target, layout.caption_start
        for patch in self.double:
            out = patch({"img": seq[:, t.start:t.stop], "img_input": seq_input[:, t.start:t.stop],
                         "txt": seq[:, cap:], "pe": layout.joint.rope[:, t.start:t.stop], "vec": t_emb, "x": x,
                         "block_index": i, "transformer_options": self.options,
                         "zimage_control_mask": control_mask(layout)})
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


def _omni(kwargs: dict, options: dict) -> OmniInputs | None:
    """Omni conditioning as ComfyUI's Lumina2.extra_conds hands it over (TextEncodeZImageOmni)."""
    refs = kwargs.get("ref_latents") or []
    if not refs:
        return None  # as ComfyUI's NextDiT: SigLIP features without reference latents are not used
    return OmniInputs(list(refs), list(kwargs.get("ref_contexts") or []), list(kwargs.get("siglip_feats") or []),
                      style=options.get(OMNI_REFERENCE_KEY, "comfyui"))


def comfy_attention(options: dict) -> Any:
    """ComfyUI's attention as a zimage_core backend, when ComfyUI's choice should win over our SDPA: an
    `optimized_attention_override` in transformer_options (a node's attention backend), or a backend the user
    picked at start-up (--use-sage-attention, --use-flash-attention, xformers). None otherwise."""
    import comfy.ldm.modules.attention as attention

    if "optimized_attention_override" not in options and not (
            mm.sage_attention_enabled() or mm.flash_attention_enabled() or mm.xformers_enabled()):
        return None

    def backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return attention.optimized_attention_masked(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                    q.shape[2], mask, skip_reshape=True, transformer_options=options)
    return backend


class ZImageDiffusionModel(ZImageTransformer):
    """zimage_core's transformer with NextDiT's call convention (ComfyUI's `diffusion_model`).

    `forward(x, timesteps, context, num_tokens, attention_mask, transformer_options=..., ref_latents=...)`:
    timesteps are ComfyUI's flow timesteps (sigma × multiplier 1.0); returns the velocity, as NextDiT does.
    """

    # Copy the block weights that ComfyUI's partial loading left in host memory blocks ahead (see
    # nodes.memory.prefetch_context); False leaves the copies to ComfyUI's per-layer cast.
    prefetch_offloaded = True

    def forward(self, x, timesteps, context, num_tokens=None, attention_mask=None, **kwargs):
        wrappers = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                             kwargs.get("transformer_options", {}))
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._comfy_forward, self, wrappers).execute(x, timesteps, context, num_tokens, attention_mask, **kwargs)

    def _comfy_forward(self, x, timesteps, context, num_tokens=None, attention_mask=None,
                       transformer_options: dict | None = None, **kwargs: Any) -> torch.Tensor:
        options = transformer_options if transformer_options is not None else {}
        patches = options.get("patches", {})
        hooks = None
        if patches.get("noise_refiner") or patches.get("double_block"):
            hooks = _ComfyBlockPatches(patches, options, len(self.layers))
        captions = _captions(context, attention_mask)
        omni = _omni(kwargs, options)

        def call(around: Any = None) -> torch.Tensor:
            runner = self.runner(options.get(BLOCK_CALL_KEY), hooks, around)
            with use_backend(comfy_attention(options)):
                return ZImageTransformer.forward(self, x, timesteps, captions, image_pos=_image_pos(options),
                                                 omni=omni, runner=runner)

        prefetch = prefetch_context(self.blocks(), x.device) if self.prefetch_offloaded else None
        if prefetch is None:
            return call()
        try:
            return call(lambda: prefetch)
        except torch.OutOfMemoryError:
            # The copy slots are memory ComfyUI's plan does not know of (its own per-layer copies need less):
            # on a card that tight, finish the step, and the job, with ComfyUI's copies instead.
            self.prefetch_offloaded = False
            log.warning("Z-Image: out of GPU memory with prefetched weights; using ComfyUI's per-layer weight "
                        "copies for this model from now on (slower, same result).")
        return call()
