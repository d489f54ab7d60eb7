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
from .model import STRENGTH_LIMIT, ControlNetConfig, ControlRun, ZImageControlNet, control_window

__all__ = [
    "LAYOUTS",
    "STRENGTH_LIMIT",
    "ControlNetConfig",
    "ControlNetLayout",
    "ControlRun",
    "ZImageControlNet",
    "control_latents",
    "control_window",
    "detect_layout",
    "is_controlnet_checkpoint",
    "load_controlnet",
    "random_controlnet_state_dict",
    "write_random_controlnet",
]
