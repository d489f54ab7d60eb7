"""Z-Image Fun ControlNet Union: the control network (model) and its file layouts (loading)."""

from __future__ import annotations

from ..checkpoint.kinds import is_controlnet_checkpoint
from .conditioning import control_latents
from .loading import (
    LAYOUTS,
    ControlNetLayout,
    detect_layout,
    load_controlnet,
    random_controlnet_state_dict,
    write_random_controlnet,
)
from .model import ControlNetConfig, ControlRun, ZImageControlNet

__all__ = [
    "LAYOUTS",
    "ControlNetConfig",
    "ControlNetLayout",
    "ControlRun",
    "ZImageControlNet",
    "control_latents",
    "detect_layout",
    "is_controlnet_checkpoint",
    "load_controlnet",
    "random_controlnet_state_dict",
    "write_random_controlnet",
]
