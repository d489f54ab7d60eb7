"""ZImageParallel: the Z-Image transformer on several local GPUs (zimage_core.parallel), as a MODEL → MODEL node.

The returned MODEL is a copy whose diffusion model holds no weights: each call hands the step to worker
processes (one per GPU, spawned at the first step, reused by later prompts, stopped when the MODEL is freed)
that hold the weights — the input model's, with its LoRA patches computed by ComfyUI's own
`comfy.lora.calculate_weight` — and run the forward sequence-parallel (Ulysses: one image split across the
GPUs) or data-parallel (the batch split: CFG's two halves, or several images). The sampler, previews, Cancel
and everything else stay on the main process.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import uuid
import weakref
from collections.abc import Iterator
from typing import Any

import comfy.model_management as mm
import comfy.patcher_extension
import torch

from ..zimage_core.checkpoint.gguf_quants import dequantize
from ..zimage_core.constants import VAE_FACTOR
from ..zimage_core.parallel.workers import MODES, ModelSpec, WorkerGroup
from ..zimage_core.transformer import TransformerConfig, ZImageTransformer
from .controlnet import ZImageControlPatch
from .model_call import BLOCK_CALL_KEY, OMNI_REFERENCE_KEY, ZImageDiffusionModel, _captions, _image_pos

log = logging.getLogger("ComfyUI-ZImage")
NODE = "ZImageParallel"


def parse_devices(gpus: str) -> list[str]:
    """`gpus`: a count ("4": cuda:0..3), a list of CUDA indices or names ("0,2" / "cuda:0,cuda:2"), or CPU
    workers ("cpu,cpu": gloo processes, for testing). Raises ValueError saying what this machine has."""
    text = str(gpus).strip().lower()
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    have = f"this machine has {cuda} CUDA GPU{'s' if cuda != 1 else ''}"
    if text.isdigit():
        count = int(text)
        if count < 2:
            raise ValueError(f"{NODE}: gpus = {count}; it needs at least 2 GPUs ({have}). Remove or bypass the "
                             "node to run on one GPU.")
        if count > cuda:
            raise ValueError(f"{NODE}: gpus = {count}, but {have}. Set gpus to at most {cuda}, or remove or "
                             "bypass the node to run on one GPU." if cuda >= 2 else
                             f"{NODE}: gpus = {count}, but {have}; it needs at least 2. Remove or bypass the node "
                             "to run on one GPU.")
        return [f"cuda:{i}" for i in range(count)]
    devices = []
    for part in (p.strip() for p in text.split(",")):
        if part == "cpu":
            devices.append("cpu")
            continue
        index = part.removeprefix("cuda:")
        if not index.isdigit():
            raise ValueError(f"{NODE}: gpus {gpus!r}: {part!r} is not a GPU; use a count (2) or GPU indices "
                             "(0,1 or cuda:0,cuda:1).")
        if int(index) >= cuda:
            raise ValueError(f"{NODE}: gpus {gpus!r}: there is no cuda:{index} ({have}).")
        devices.append(f"cuda:{int(index)}")
    if len(devices) < 2:
        raise ValueError(f"{NODE}: gpus {gpus!r} names {len(devices)} device; it needs at least 2 ({have}).")
    if ("cpu" in devices) != all(d == "cpu" for d in devices):
        raise ValueError(f"{NODE}: gpus {gpus!r} mixes CPU and GPU workers; use GPUs only.")
    if len(set(devices)) != len(devices) and devices[0] != "cpu":
        raise ValueError(f"{NODE}: gpus {gpus!r} names a GPU twice.")
    return devices


def _unsupported_layers(dm: ZImageDiffusionModel) -> list[str]:
    """State-dict keys a plain transformer of this config does not have (fp8-matmul / comfy_quant layers)."""
    with torch.device("meta"):
        plain = ZImageTransformer(dm.config)
    expected = set(plain.state_dict())
    return sorted(k for k in dm.state_dict() if k not in expected)


def _weights(patches: dict, dm: ZImageDiffusionModel, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights the workers hold: each in `dtype`, with the MODEL's weight patches (LoRA) applied the way
    ComfyUI's ModelPatcher applies them (float32 `calculate_weight`); a GGUF layer's bytes dequantised first."""
    import comfy.lora

    modules = dict(dm.named_modules())
    for name, tensor in dm.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        layer = modules.get(owner)
        if leaf == "weight" and getattr(layer, "gguf_type", None):
            tensor = dequantize(tensor, layer.gguf_type, layer.gguf_shape, torch.float32)
        key = f"diffusion_model.{name}"
        if key in patches:
            tensor = comfy.lora.calculate_weight(patches[key], tensor.to(torch.float32, copy=True), key)
        yield name, tensor.to(dtype)


class ParallelDiffusionModel(torch.nn.Module):
    """A weightless stand-in for ZImageDiffusionModel (NextDiT's call convention) whose forwards run on a
    WorkerGroup."""

    def __init__(self, config: TransformerConfig, dtype: torch.dtype, group: WorkerGroup) -> None:
        super().__init__()
        self.config = config
        self._dtype = dtype
        self.group = group
        self._finalizer = weakref.finalize(self, group.close)  # the workers go with the model
        self._keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ControlNet -> its key in the group
        # Set to float32 by precision.fp32_compute (on_nan recompute_fp32), which the workers cannot honour.
        self.compute_dtype: torch.dtype | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def forward(self, x, timesteps, context, num_tokens=None, attention_mask=None, **kwargs: Any) -> torch.Tensor:
        # ComfyUI's DIFFUSION_MODEL wrappers (our samplers' NaN check, ZImageSeedVariety) run here, as on one GPU.
        wrappers = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                             kwargs.get("transformer_options", {}))
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._call, self, wrappers).execute(x, timesteps, context, num_tokens, attention_mask, **kwargs)

    def _call(self, x, timesteps, context, num_tokens=None, attention_mask=None, transformer_options=None,
              **kwargs: Any) -> torch.Tensor:
        options = transformer_options or {}
        if self.compute_dtype == torch.float32 and self._dtype != torch.float32:
            raise ValueError(f"{NODE}: a step gave NaN/inf and on_nan asks to recompute it in float32, which the "
                             f"GPU workers (computing in {str(self._dtype).replace('torch.', '')}) cannot do. Set "
                             "on_nan to error, or run this prompt without ZImageParallel.")
        controls = self._controls(options.get("patches", {}), x, options)
        if options.get(BLOCK_CALL_KEY) is not None:
            log.warning("%s: the compiled blocks of ZImageCompileModel are not used by the GPU workers.", NODE)
        refs = {"ref_latents": list(kwargs.get("ref_latents") or []),
                "captions": list(kwargs.get("ref_contexts") or []), "siglip": list(kwargs.get("siglip_feats") or [])}
        return self.group.forward(x, timesteps, _captions(context, attention_mask), image_pos=_image_pos(options),
                                  refs=refs if refs["ref_latents"] else None,
                                  omni_style=options.get(OMNI_REFERENCE_KEY, "comfyui"), controls=controls,
                                  check_interrupt=mm.throw_exception_if_processing_interrupted)

    def _controls(self, patches: dict, x: torch.Tensor, options: dict) -> list[dict]:
        """The active ZImageControlNetApply patches as the workers' ControlRun arguments; the control latent is
        encoded here (the VAE stays on the main process), the ControlNet's weights go to the workers once."""
        refiner, double = patches.get("noise_refiner", []), patches.get("double_block", [])
        ours = list(dict.fromkeys(p for p in [*refiner, *double] if isinstance(p, ZImageControlPatch)))
        if len(ours) != len(set(map(id, [*refiner, *double]))):
            raise ValueError(f"{NODE}: this sampler's model has block patches other than Z-Image ControlNet Apply's "
                             "(another node's noise_refiner / double_block patch); they do not run on the GPU "
                             "workers. Apply them to a model without ZImageParallel.")
        controls = []
        for patch in ours:
            sigma = options.get("sigmas")
            high, low = patch.sigma_range
            if sigma is not None and not low <= float(sigma.max()) <= high:
                continue  # outside its start/end percent
            net = patch.controlnet.model
            key = self._keys.setdefault(net, uuid.uuid4().hex)
            if key not in self.group.controlnets:
                dtype = self._dtype
                self.group.controlnets[key] = (dataclasses.asdict(net.config), lambda net=net, dtype=dtype: (
                    (name, t.to(dtype)) for name, t in net.state_dict().items()))
            run = patch.run
            controls.append({"key": key, "control": patch.encode_for(x.shape[-2] * VAE_FACTOR, x.shape[-1] * VAE_FACTOR),
                             "strength": run.strength, "style": "diffusers" if run.diffusers else "comfyui",
                             "axes_dims": tuple(run.axes_dims), "rope_theta": run.rope_theta})
        return controls


def parallel_model(model: Any, devices: list[str], mode: str, timeout_s: float) -> Any:
    """A copy of `model` (the input is not changed) whose transformer runs on `devices`."""
    dm = model.get_model_object("diffusion_model")
    if not isinstance(dm, ZImageDiffusionModel):
        raise ValueError(f"{NODE}: this MODEL is not from ZImageModelLoader (ComfyUI's own Z-Image model cannot be "
                         "split); load the transformer with ZImageModelLoader.")
    odd = _unsupported_layers(dm)
    if odd:
        raise ValueError(f"{NODE}: this model has quantized layers ({odd[0]}, ...: fp8 matmul or a comfy_quant "
                         "file) that the GPU workers cannot hold yet. Load it with weight_dtype default, bf16 or "
                         "fp8_e4m3fn.")
    dtype = dm.dtype  # the workers hold the weights in the compute dtype (fp8 storage, GGUF: bf16 on each GPU)
    patches = dict(model.patches)
    group = WorkerGroup(devices, ModelSpec(_config_dict(dm.config), str(dtype),
                                           fp8_attention=any(getattr(b.attention, "fp8_attention", False)
                                                             for b in dm.layers)),
                        lambda: _weights(patches, dm, dtype), mode=mode, timeout_s=timeout_s)
    out = model.clone()
    base = copy.copy(model.model)  # a new BaseModel sharing all but the diffusion model
    for attr in ("_modules", "_parameters", "_buffers"):
        setattr(base, attr, dict(getattr(base, attr)))
    base._modules["diffusion_model"] = ParallelDiffusionModel(dm.config, dtype, group)
    for attr, value in (("model_loaded_weight_memory", 0), ("lowvram_patch_counter", 0),
                        ("current_weight_patches_uuid", None), ("model_lowvram", False)):
        if hasattr(base, attr):
            setattr(base, attr, value)
    out.model = base
    out.patches = {}  # computed into the workers' weights
    out.patches_uuid = uuid.uuid4()
    out.backup = {}
    out.size = 0
    return out


def _config_dict(config: TransformerConfig) -> dict:
    return dataclasses.asdict(config)


class ZImageParallel:
    DESCRIPTION = ("Runs the Z-Image transformer on several local GPUs. sequence: one image split across the GPUs "
                   "(Ulysses sequence parallelism; for large images and Base with CFG). data: the batch split "
                   "across them (CFG's two halves, or several images at once; more images per second). Each GPU "
                   "holds a full copy of the weights (LoRAs applied); the workers start at the first step (a "
                   "few seconds to copy the weights), are reused by later prompts and stop when the model is "
                   "freed. Returns a new MODEL; the input model is unchanged. Z-Image ControlNet Apply works before or "
                   "after it. Not yet: fp8-matmul weights.")
    CATEGORY = "Z-Image/advanced"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model running on the GPUs; connect it to a sampler.",)
    FUNCTION = "parallel"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "From ZImageModelLoader (LoRAs may be applied first)."}),
            "gpus": ("STRING", {"default": "2", "tooltip": "How many GPUs (2 = cuda:0 and cuda:1), or which: "
                                "0,1,2,3 or cuda:0,cuda:2."}),
            "mode": (list(MODES), {"default": "sequence", "tooltip": "sequence: one image split across the GPUs "
                                   "(faster images). data: the batch split across them (more images per "
                                   "second; needs a batch, or CFG)."}),
        }, "optional": {
            "timeout_s": ("INT", {"default": 300, "min": 10, "max": 3600, "advanced": True,
                                  "tooltip": "Seconds a collective between the GPUs may wait before it fails "
                                             "(a dead or stuck GPU gives an error, not a hang)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, gpus: str = "2", mode: str = "sequence"):
        try:
            parse_devices(gpus)
        except ValueError as e:
            return str(e)
        if mode not in MODES:
            return f"{NODE}: mode must be one of {list(MODES)}, got {mode!r}."
        return True

    def parallel(self, model, gpus: str = "2", mode: str = "sequence", timeout_s: int = 300):
        devices = parse_devices(gpus)
        log.info("%s: %s mode on %s", NODE, mode, ", ".join(devices))
        return (parallel_model(model, devices, mode, float(timeout_s)),)
