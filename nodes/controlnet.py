"""Fun ControlNet Union nodes: load any published layout, apply it to a Z-Image MODEL as a model patch.

The patch is ComfyUI's own mechanism (the `noise_refiner` / `double_block` patches that ComfyUI's
ZImageFunControlnet also uses), set on a clone of the MODEL, so it works on this pack's MODEL and on
ComfyUI's native Z-Image MODEL (ComfyUI versions whose NextDiT calls those patches). The control math is
zimage_core's `ControlRun`; here are only ComfyUI's services: files, VAE encoding, sigma range, devices.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import folder_paths
import torch

from ..zimage_core.checkpoint import model_fingerprint
from ..zimage_core.controlnet import (
    STRENGTH_LIMIT,
    ControlRun,
    control_latents,
    control_window,
    load_controlnet,
)
from ..zimage_core.controlnet.conditioning import fit_image
from ..zimage_core.transformer import ZImageTransformer
from .comfy_compat import loaded_models
from .core_model import CorePatcher, is_zimage_model, load_options
from .errors import check_widgets, load_explained
from .inpaint import mask_batch

log = logging.getLogger("ComfyUI-ZImage")

NODE_CATEGORY = "Z-Image/controlnet"
FOLDERS = ("model_patches", "controlnet")  # ComfyUI's folder for these files first, then the usual one
SPATIAL = 8  # pixels per latent cell (FLUX VAE)
STYLES = {
    "diffusers": "diffusers",
    "comfyui": "comfyui",
    "videox-fun": "videox",
}


def _folder_models(folder: str) -> list[str]:
    """diffusers ZImageControlNetModel folders (config.json + weights) directly inside a model folder."""
    found = []
    for root in folder_paths.get_folder_paths(folder):
        if os.path.isdir(root):
            for name in sorted(os.listdir(root)):
                if os.path.isfile(os.path.join(root, name, "config.json")):
                    found.append(name + "/")
    return found


def controlnet_choices() -> list[str]:
    names: list[str] = []
    for folder in FOLDERS:
        for name in folder_paths.get_filename_list(folder) + _folder_models(folder):
            if name not in names:
                names.append(name)
    return names


def resolve_controlnet(name: str) -> str:
    for folder in FOLDERS:
        for root in folder_paths.get_folder_paths(folder):
            path = os.path.join(root, name.rstrip("/"))
            if name.endswith("/") and os.path.isdir(path):
                return path
        if not name.endswith("/"):
            path = folder_paths.get_full_path(folder, name)
            if path is not None:
                return path
    raise FileNotFoundError(f"Z-Image ControlNet Loader: {name!r} is not in models/model_patches or "
                            "models/controlnet. Put the Fun ControlNet Union file there and refresh.")


class ZImageControlNetLoader:
    DESCRIPTION = ("Loads an alibaba-pai Fun ControlNet Union / Tile file for Z-Image-Turbo (1.0, 2.0, 2.1, 2.1 "
                   "2601/2602, lite) or Z-Image Base (Z-Image-Fun-Controlnet-Union-2.1, lite) from "
                   "models/model_patches or models/controlnet, or a diffusers ZImageControlNetModel folder there. "
                   "The layout is told apart by its tensors; Base and Turbo files share layouts, so which model "
                   "a file is for comes from its name. The node shows what it detected.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("ZIMAGE_CONTROLNET",)
    OUTPUT_TOOLTIPS = ("The control network, for Z-Image ControlNet Apply.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "control_net_name": (controlnet_choices(), {
                "display_name": "controlnet",
                "tooltip": "Z-Image-Turbo-Fun-Controlnet-Union*.safetensors (Turbo) or "
                           "Z-Image-Fun-Controlnet-Union-2.1*.safetensors (Base), or -Tile-2.1*, in "
                           "models/model_patches or models/controlnet, or a diffusers controlnet folder there."}),
        }}

    @classmethod
    def IS_CHANGED(cls, control_net_name: str) -> str:
        try:
            return model_fingerprint(resolve_controlnet(control_net_name))
        except Exception:  # noqa: BLE001 - the loader itself reports an unknown name
            return "missing"

    def load(self, control_net_name: str):
        path = resolve_controlnet(control_net_name)
        # Weights stay in the file's dtype; manual_cast computes in the activations' dtype (as ComfyUI's
        # ModelPatchLoader does), so one file serves bf16 GPUs and fp32 CPUs alike.
        net, layout = load_explained(
            lambda: load_controlnet(path, device=mm.unet_offload_device(), operations=comfy.ops.manual_cast,
                                    **load_options()),
            path, "a Z-Image Fun ControlNet Union file (Z-Image-Turbo-Fun-Controlnet-Union*.safetensors)",
            "Download it from alibaba-pai's Hugging Face page into models/model_patches.")
        net.layout = layout
        report = layout.describe()
        if layout.family is None:
            report += ("\nThe file's name does not say whether it is for Z-Image-Turbo or Z-Image Base (both use "
                       "this layout); use it with the model it was trained for.")
        log.info("Z-Image ControlNet %s: %s", path, report)
        patcher = CorePatcher(net, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
        return {"ui": {"text": [report]}, "result": (patcher,)}


def _native_has_block_patches() -> bool:
    # ComfyUI added noise_refiner/double_block patches to NextDiT together with its Z-Image control model.
    return importlib.util.find_spec("comfy.ldm.lumina.controlnet") is not None


class ZImageControlPatch:
    """The model patch: one ControlRun, fed ComfyUI's noise_refiner / double_block patch arguments."""

    def __init__(self, controlnet: Any, diffusion_model: Any, run: ControlRun, encode_for: Any,
                 sigma_range: tuple[float, float]) -> None:
        self.controlnet = controlnet
        self.diffusion_model = diffusion_model
        self.run = run
        self.encode_for = encode_for  # (height, width) in pixels → control latent
        self.sigma_range = sigma_range
        self.active = False

    def _rerun(self, pe: torch.Tensor, vec: torch.Tensor, options: dict):
        dm = self.diffusion_model
        if isinstance(dm, ZImageTransformer):
            return lambda j, h: dm.noise_refiner[j](h, pe, None, vec)
        return lambda j, h: dm.noise_refiner[j](h, None, pe, vec, transformer_options=options)

    def __call__(self, kwargs: dict) -> dict:
        x = kwargs["x"]
        n_img = (x.shape[-2] // 2) * (x.shape[-1] // 2)
        i = kwargs["block_index"]
        options = kwargs.get("transformer_options", {})
        img, img_input, txt = kwargs.pop("img"), kwargs["img_input"], kwargs.pop("txt")  # edited in place
        if kwargs.get("block_type") == "noise_refiner":
            if i == 0:
                sigma = options.get("sigmas")
                high, low = self.sigma_range
                self.active = sigma is None or bool(low <= float(sigma.max()) <= high)
                if self.active:
                    self.run.control = self.encode_for(x.shape[-2] * SPATIAL, x.shape[-1] * SPATIAL)
            if self.active:
                self.run.after_noise_refiner(i, img, img_input, txt, kwargs["pe"], kwargs["vec"], n_img,
                                             self._rerun(kwargs["pe"], kwargs["vec"], options))
        elif self.active:
            # Our MODEL passes the [image; caption] key mask of a batch whose captions differ in length.
            self.run.after_layer(i, img, img_input, txt, kwargs["pe"], kwargs["vec"], n_img,
                                 kwargs.get("zimage_control_mask"))
        return kwargs

    def to(self, device_or_dtype: Any) -> ZImageControlPatch:
        return self  # the control latent moves to the activations' device when used

    def models(self) -> list:
        return [self.controlnet]


class _ControlLatents:
    """Encodes the control / inpaint images once per latent size (the first step of each sampling)."""

    def __init__(self, vae: Any, latent_format: Any, in_channels: int, style: str, image: torch.Tensor | None,
                 inpaint_image: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        self.vae, self.latent_format, self.in_channels, self.style = vae, latent_format, in_channels, style
        self.image, self.inpaint_image, self.mask = image, inpaint_image, mask
        self.cache: dict[tuple[int, int], torch.Tensor] = {}

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.latent_format.process_in(self.vae.encode(pixels)).float().to(mm.intermediate_device())

    def __call__(self, height: int, width: int) -> torch.Tensor:
        key = (height, width)
        if key not in self.cache:
            # Sampling has the model loaded; encoding may evict it, so it is loaded back afterwards.
            loaded = loaded_models()
            fit = [None if t is None else fit_image(t.float(), height, width) for t in (self.image, self.inpaint_image)]
            mask = None
            if self.mask is not None:
                m = self.mask.float().reshape(-1, *self.mask.shape[-2:])[..., None]
                mask = fit_image(m, height, width, "bilinear")[..., 0]
            self.cache = {key: control_latents(self.encode, self.in_channels, control_image=fit[0],
                                               inpaint_image=fit[1], mask=mask, style=self.style)}
            if loaded:
                mm.load_models_gpu(loaded)
        return self.cache[key]


class ZImageControlNetApply:
    DESCRIPTION = ("Steers a Z-Image MODEL with a Fun ControlNet Union: a control image (canny, depth, pose, tile, "
                   "...: preprocess it with the core nodes) and, for 2.x files, an inpaint image and mask. Returns "
                   "a patched copy of the MODEL for any sampler. Works on this pack's MODEL and on ComfyUI's "
                   "native Z-Image MODEL (UNETLoader).")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The MODEL with the ControlNet applied (the input MODEL is left unchanged).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Z-Image MODEL (Z-Image Model Loader or UNETLoader)."}),
                "controlnet": ("ZIMAGE_CONTROLNET", {"tooltip": "From Z-Image ControlNet Loader."}),
                "vae": ("VAE", {"tooltip": "The FLUX VAE (ae.safetensors) that encodes the control image."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -STRENGTH_LIMIT, "max": STRENGTH_LIMIT, "step": 0.01,
                                       "tooltip": "Scale of the control hints. alibaba-pai suggests 0.65-1.0."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                            "tooltip": "Fraction of the sampling where the control starts."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                          "tooltip": "Fraction of the sampling where the control stops."}),
                "reference": (list(STYLES), {
                    "default": "diffusers",
                    "tooltip": "Which implementation to reproduce. diffusers: ZImageControlNetPipeline / "
                               "ZImageControlNetInpaintPipeline (control blocks also see the prompt). comfyui: "
                               "ComfyUI's ZImageFunControlnet node (image tokens only). videox-fun: alibaba-pai's "
                               "own VideoX-Fun code the files were trained with (as diffusers, but the refiner "
                               "hints also go into the model's noise refiner)."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "The control image (canny, depth, pose, tile ...). Resized to the "
                                               "latent's size if it differs."}),
                "inpaint_image": ("IMAGE", {"tooltip": "2.x only: the image to inpaint (its unmasked part is kept)."}),
                "mask": ("MASK", {"tooltip": "2.x only: white = repaint. Uses the 2.x inpaint channels."}),
            },
        }

    def apply(self, model, controlnet, vae, strength, start_percent, end_percent, reference="diffusers",
              image=None, inpaint_image=None, mask=None):
        # No VALIDATE_INPUTS naming these: ComfyUI then keeps its own min/max checks of them at queue time.
        check_widgets(type(self), strength=strength, start_percent=start_percent, end_percent=end_percent)
        try:
            control_window(start_percent, end_percent)
        except ValueError as e:
            raise ValueError(f"Z-Image ControlNet Apply: {e}") from None
        if not is_zimage_model(model):
            raise ValueError("Z-Image ControlNet Apply: the MODEL is not Z-Image; load z_image_turbo_bf16.safetensors "
                             "with Z-Image Model Loader (or UNETLoader).")
        net = controlnet.model
        layout = getattr(net, "layout", None)
        cfg = net.config
        dm = model.model.diffusion_model
        if not isinstance(dm, ZImageTransformer) and not _native_has_block_patches():
            raise ValueError("Z-Image ControlNet Apply: this ComfyUI's native Z-Image model (UNETLoader) has no "
                             "block patches. Load the model with Z-Image Model Loader, or update ComfyUI.")
        if image is None and inpaint_image is None:
            raise ValueError("Z-Image ControlNet Apply: connect a control image (or, for 2.x files, an "
                             "inpaint_image with a mask).")
        if not cfg.inpaint and (inpaint_image is not None or mask is not None):
            name = layout.describe() if layout else "this ControlNet"
            raise ValueError(f"Z-Image ControlNet Apply: {name} has no inpaint channels; inpainting needs a 2.x "
                             "file (Z-Image-Turbo-Fun-Controlnet-Union-2.1).")
        if image is None and not cfg.inpaint:
            raise ValueError("Z-Image ControlNet Apply: connect a control image.")
        if mask is not None:  # the same check as ZImageInpaintMask's: NaN/inf refused, values clamped to 0..1
            mask = mask_batch(mask, "Z-Image ControlNet Apply")
        if getattr(vae, "latent_channels", 16) != 16:
            raise ValueError("Z-Image ControlNet Apply: the VAE must be the 16-channel FLUX VAE (ae.safetensors).")
        family = getattr(layout, "family", None)
        model_family = getattr(model.model, "zimage_family", None)
        if family and model_family and family != model_family:
            # Same transformer shapes, so it runs; but the control was trained on the other model's features.
            log.warning("Z-Image ControlNet Apply: %s is for %s, but the MODEL's file name says %s. It runs (same "
                        "transformer layout); for the intended results use alibaba-pai's %s ControlNet.",
                        layout.describe().split(":")[0], family, model_family, model_family)
        unet = model.model.model_config.unet_config
        axes = tuple(unet.get("axes_dims") or (32, 48, 48))
        theta = float(unet.get("rope_theta", 256.0))
        latents = _ControlLatents(vae, model.model.latent_format, cfg.in_channels, STYLES[reference],
                                  None if image is None else image[..., :3],
                                  None if inpaint_image is None else inpaint_image[..., :3], mask)
        sampling = model.get_model_object("model_sampling")
        sigma_range = (float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent)))
        run = ControlRun(net, torch.zeros(0), strength, style=STYLES[reference], axes_dims=axes, rope_theta=theta)
        patch = ZImageControlPatch(controlnet, dm, run, latents, sigma_range)
        patched = model.clone()
        patched.set_model_patch(patch, "noise_refiner")
        patched.set_model_patch(patch, "double_block")
        return (patched,)
