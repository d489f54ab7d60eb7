"""ComfyUI nodes of ComfyUI-ZImage. Thin: types and ComfyUI services here, model code in zimage_core."""

from .compile import ZImageCompileModel, ZImageCompileVAE
from .conditioning import ZImageTextEncode
from .controlnet import ZImageControlNetApply, ZImageControlNetLoader
from .enhancer import ZImagePromptEnhancer
from .inpaint import ZImageInpaintComposite, ZImageInpaintMask
from .latent import ZImageEmptyLatent
from .loaders import ZImageModelLoader, ZImageTextEncoderLoader, ZImageVAELoader
from .lora import ZImageLoraLoader
from .omni import ZImageOmniReference
from .parallel import ZImageParallel
from .sampling import ZImageCFGOptions, ZImageImg2ImgSampler, ZImageTurboSampler
from .vae import ZImageVAEDecode, ZImageVAEEncode
from .variety import ZImageSeedVariety

NODE_CLASS_MAPPINGS = {
    "ZImageModelLoader": ZImageModelLoader,
    "ZImageTextEncoderLoader": ZImageTextEncoderLoader,
    "ZImageVAELoader": ZImageVAELoader,
    "ZImageLoraLoader": ZImageLoraLoader,
    "ZImageTextEncode": ZImageTextEncode,
    "ZImagePromptEnhancer": ZImagePromptEnhancer,
    "ZImageEmptyLatent": ZImageEmptyLatent,
    "ZImageTurboSampler": ZImageTurboSampler,
    "ZImageImg2ImgSampler": ZImageImg2ImgSampler,
    "ZImageCFGOptions": ZImageCFGOptions,
    "ZImageSeedVariety": ZImageSeedVariety,
    "ZImageVAEEncode": ZImageVAEEncode,
    "ZImageVAEDecode": ZImageVAEDecode,
    "ZImageInpaintMask": ZImageInpaintMask,
    "ZImageInpaintComposite": ZImageInpaintComposite,
    "ZImageCompileModel": ZImageCompileModel,
    "ZImageCompileVAE": ZImageCompileVAE,
    "ZImageControlNetLoader": ZImageControlNetLoader,
    "ZImageControlNetApply": ZImageControlNetApply,
    "ZImageOmniReference": ZImageOmniReference,
    "ZImageParallel": ZImageParallel,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ZImageModelLoader": "Z-Image Model Loader",
    "ZImageTextEncoderLoader": "Z-Image Text Encoder Loader",  # Qwen3-4B: a longer title is cut off at 320 px
    "ZImageVAELoader": "Z-Image VAE Loader",
    "ZImageLoraLoader": "Z-Image LoRA Loader (any trainer's format)",
    "ZImageTextEncode": "Z-Image Text Encode",
    "ZImagePromptEnhancer": "Z-Image Prompt Enhancer (offline, Qwen3-4B)",
    "ZImageEmptyLatent": "Z-Image Empty Latent",
    "ZImageTurboSampler": "Z-Image Turbo Sampler",
    "ZImageImg2ImgSampler": "Z-Image Img2Img Sampler",
    "ZImageCFGOptions": "Z-Image CFG Options (normalization, truncation)",
    "ZImageSeedVariety": "Z-Image Seed Variety",
    "ZImageVAEEncode": "Z-Image VAE Encode",
    "ZImageVAEDecode": "Z-Image VAE Decode",
    "ZImageInpaintMask": "Z-Image Inpaint Mask (grow/feather)",
    "ZImageInpaintComposite": "Z-Image Inpaint Composite",
    "ZImageCompileModel": "Z-Image Compile Model (torch.compile)",
    "ZImageCompileVAE": "Z-Image Compile VAE (fused GroupNorm·SiLU)",
    "ZImageControlNetLoader": "Z-Image ControlNet Loader (Fun Union)",
    "ZImageControlNetApply": "Z-Image ControlNet Apply",
    "ZImageOmniReference": "Z-Image Omni Reference Layout",
    "ZImageParallel": "Z-Image Parallel (several GPUs)",
}
