"""Which reference's Omni layout our MODEL follows (ComfyUI's, the default, or diffusers')."""

from __future__ import annotations

from ..zimage_core.transformer.sequence import STYLES
from .model_call import OMNI_REFERENCE_KEY, ZImageDiffusionModel


class ZImageOmniReference:
    """A clone of the MODEL whose Omni reference images (TextEncodeZImageOmni) follow the chosen reference's
    token layout. The two references differ in the SigLIP and caption positions and in which tokens count
    as noisy (README: Omni reference images); ComfyUI's is what its own models run."""

    CATEGORY = "Z-Image"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Z-Image MODEL from Z-Image Model Loader (LoRAs may be applied)."}),
            "reference": (list(STYLES), {"default": STYLES[0], "tooltip":
                                         "comfyui: as ComfyUI's native Z-Image model (what shared workflows "
                                         "run). diffusers: as diffusers' ZImageOmniPipeline."}),
        }}

    def apply(self, model, reference: str):
        if not isinstance(getattr(model.model, "diffusion_model", None), ZImageDiffusionModel):
            raise ValueError("ZImageOmniReference: this MODEL is not from Z-Image Model Loader; ComfyUI's own "
                             "Z-Image model always follows ComfyUI's layout. Load the model with Z-Image Model Loader.")
        if reference not in STYLES:
            raise ValueError(f"ZImageOmniReference: reference must be one of {list(STYLES)}, got {reference!r}.")
        patched = model.clone()
        patched.model_options.setdefault("transformer_options", {})[OMNI_REFERENCE_KEY] = reference
        return (patched,)
