"""ComfyUI-ZImage: Z-Image-Turbo nodes for ComfyUI (entry point ComfyUI's custom-node loader imports)."""

import importlib.util


def _inside_comfyui() -> bool:
    # ComfyUI imports this file as a package with its own folder on sys.path; anything else (pytest
    # collecting the checkout, a stray `import`) gets an empty pack instead of an ImportError.
    return bool(__package__) and importlib.util.find_spec("folder_paths") is not None


if _inside_comfyui():
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
