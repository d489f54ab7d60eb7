"""One place that turns unexpected loader failures into the clear CheckpointError users see."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..zimage_core.errors import CheckpointError

T = TypeVar("T")


def load_explained(load: Callable[[], T], path: str, what: str, fix: str) -> T:
    """Run a zimage_core loader. It raises CheckpointError for files it recognises as wrong; anything
    else from deep inside loading still becomes one clear message naming the file and the fix."""
    import comfy.model_management as mm

    try:
        return load()
    except (CheckpointError, mm.InterruptProcessingException):
        raise  # already clear, or the user's Cancel
    except Exception as e:  # noqa: BLE001 - turned into one clear message
        raise CheckpointError(path, what, f"a file that could not be loaded ({type(e).__name__}: {e})", fix) from e
