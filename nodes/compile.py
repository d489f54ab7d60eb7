"""The opt-in speed nodes. Neither changes the model it is given: each returns a new one.

ZImageCompileModel clones the MODEL and adds a diffusion-model wrapper that hands zimage_core's
transformer a compiled block runner (regional torch.compile: one compiled graph shared by the 30 main
blocks plus one for the noise refiner) for the calls of that clone only. ZImageCompileVAE returns a fused
copy of the VAE.

Compiled artifacts persist in `<ComfyUI user directory>/__zimage/compile_cache` (zimage_core CompileCache), so
a restarted ComfyUI loads them instead of compiling from scratch. Loading them runs code, so the folder is one
ComfyUI serves to no one ("__" folders of the user directory are internal), each file must carry an HMAC under
a key only this installation holds (`__zimage/compile_cache.key`, mode 0600), and `ZIMAGE_COMPILE_CACHE` (another
folder, or `off`) is refused when it names a folder a web client can write to.
"""

from __future__ import annotations

import logging
import os

import comfy.patcher_extension
import folder_paths

from ..zimage_core.accel import CompileCache, CompiledBlockCall
from .core_model import BLOCK_CALL_KEY, ZImageDiffusionModel
from .core_vae import ZImageCoreVAE, fused_copy

NODE_CATEGORY = "Z-Image/advanced"
WRAPPER_KEY = "zimage_compile"
log = logging.getLogger("ComfyUI-ZImage")


PRIVATE_FOLDER = "zimage"  # ComfyUI's system-user folder <user dir>/__zimage: served by no endpoint
CACHE_FOLDER = "compile_cache"
KEY_FILE = "compile_cache.key"


def _private_dir() -> str:
    get = getattr(folder_paths, "get_system_user_directory", None)
    if get is not None:
        return get(PRIVATE_FOLDER)
    return os.path.join(folder_paths.get_user_directory(), "__" + PRIVATE_FOLDER)  # ComfyUI before the helper


def _inside(path: str, folder: str) -> bool:
    folder = os.path.realpath(folder)
    return os.path.commonpath((path, folder)) == folder


def served_folder(path: str) -> str | None:
    """Which ComfyUI folder that web clients can write to (or read) holds `path`, if any: input, output and
    temp (/upload, /view) and every public user folder <user dir>/<user> (/userdata)."""
    real = os.path.realpath(path)
    for name in ("input", "output", "temp"):
        folder = folder_paths.get_directory_by_type(name)
        if folder and _inside(real, folder):
            return f"ComfyUI's {name} folder ({folder})"
    user = os.path.realpath(folder_paths.get_user_directory())
    if _inside(real, user) and real != user:
        top = os.path.relpath(real, user).split(os.sep)[0]
        if not top.startswith("__"):
            return f"ComfyUI's user folder {os.path.join(user, top)} (served by /userdata)"
    return None


def compile_cache_dir() -> str | None:
    """Where compiled artifacts persist: $ZIMAGE_COMPILE_CACHE (a folder, or off/0/false to disable), else
    <user dir>/__zimage/compile_cache. None (cache off, with a warning) for a folder web clients can reach."""
    env = os.environ.get("ZIMAGE_COMPILE_CACHE")
    if env is None:
        return os.path.join(_private_dir(), CACHE_FOLDER)
    if env.strip().lower() in ("", "0", "off", "false", "no"):
        return None
    served = served_folder(env)
    if served is not None:
        log.warning("ZImageCompileModel: ZIMAGE_COMPILE_CACHE=%s is inside %s, where a web client can put files; "
                    "loading compiled code from there would let it run code on this machine. The compile cache is "
                    "off. Point ZIMAGE_COMPILE_CACHE at a private folder outside ComfyUI's input, output, temp and "
                    "user/<user> folders, or unset it.", env, served)
        return None
    return env


def compile_cache_key_file() -> str:
    """The cache's signing key: in ComfyUI's internal user folder, never in the (maybe shared) cache folder."""
    return os.path.join(_private_dir(), KEY_FILE)


class CompiledBlocksWrapper:
    """DIFFUSION_MODEL wrapper: hands the transformer the compiled block runner for this call (after a
    compiler failure the transformer disables it and runs eagerly)."""

    def __init__(self, mode: str | None, cache_dir: str | None = None) -> None:
        cache = CompileCache(cache_dir, key_file=compile_cache_key_file()) if cache_dir else None
        self.block_call = CompiledBlockCall(mode, cache=cache)

    def __call__(self, executor, *args, **kwargs):
        if self.block_call.enabled:
            kwargs["transformer_options"] = {**kwargs.get("transformer_options", {}), BLOCK_CALL_KEY: self.block_call}
        return executor(*args, **kwargs)


class ZImageCompileModel:
    DESCRIPTION = ("Compiles the Z-Image transformer's blocks with torch.compile (regional: one block compiled "
                   "and reused by all 30). On an H100 a step at 1024² drops from ~112 ms to ~90 ms. The first "
                   "run at each new resolution compiles (~15 s); the compiled code is kept in ComfyUI's user "
                   "folder (__zimage/compile_cache, signed, served to no one), so after a restart it loads instead of compiling again. "
                   "Returns a new MODEL: the input model and other branches stay uncompiled. Falls back to the "
                   "normal path if compilation is not available.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A compiled copy of the model (weights shared); connect it to a sampler.",)
    FUNCTION = "compile"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "From ZImageModelLoader (LoRAs may be applied first)."}),
            "mode": (["default", "max-autotune-no-cudagraphs"], {
                "default": "default",
                "tooltip": "torch.compile mode. default compiles fastest; max-autotune-no-cudagraphs "
                           "searches GEMM configurations (minutes of compiling, sometimes a few % faster)."}),
        }}

    def compile(self, model, mode: str = "default"):
        if not isinstance(model.get_model_object("diffusion_model"), ZImageDiffusionModel):
            raise ValueError("ZImageCompileModel: this MODEL is not from ZImageModelLoader. Use ComfyUI's "
                             "TorchCompileModel for other models.")
        wrapper = CompiledBlocksWrapper(None if mode == "default" else mode, compile_cache_dir())
        if not wrapper.block_call.enabled:
            log.warning("ZImageCompileModel: torch.compile is unavailable; the model runs uncompiled.")
        compiled = model.clone()
        compiled.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
        compiled.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, wrapper)
        return (compiled,)


class ZImageCompileVAE:
    DESCRIPTION = ("Fuses the VAE's GroupNorm+SiLU pairs into compiled kernels on the channels-last layout "
                   "(zimage_core FluxVAE.fuse_norm_act). On an H100 a 1024² decode drops from ~90 ms to "
                   "~50 ms. The first decode compiles (~11 s with a cold inductor cache). Returns a new VAE "
                   "(a copy of the weights, ~170 MB); the input VAE is unchanged.")
    CATEGORY = NODE_CATEGORY
    RETURN_TYPES = ("VAE",)
    OUTPUT_TOOLTIPS = ("A fused copy of the VAE; connect it to ZImageVAEDecode / VAEDecode.",)
    FUNCTION = "compile"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("VAE", {"tooltip": "From ZImageVAELoader."})}}

    def compile(self, vae):
        if not isinstance(vae, ZImageCoreVAE):
            raise ValueError("ZImageCompileVAE: this VAE is not from ZImageVAELoader; load ae.safetensors with "
                             "ZImageVAELoader to use the fused kernels.")
        return (fused_copy(vae),)
