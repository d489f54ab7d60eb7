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


def check_widgets(node_cls: type, **values: object) -> None:
    """Refuse numeric widget values outside the bounds the node declares in INPUT_TYPES, and NaN.

    ComfyUI checks a widget's min/max when a prompt is queued, but lets NaN through (NaN < min is false) and
    checks nothing for a value that arrives through a link (a primitive node). Called first thing when the
    node runs, with the inputs by name; the message names the input, the value and the range to use.
    """
    import math

    spec = node_cls.INPUT_TYPES()
    inputs = {**spec.get("required", {}), **spec.get("optional", {})}
    for name, value in values.items():
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        options = inputs[name][1] if len(inputs[name]) > 1 else {}
        lo, hi = options.get("min"), options.get("max")
        bad = isinstance(value, float) and math.isnan(value)
        bad = bad or (lo is not None and value < lo) or (hi is not None and value > hi)
        if bad:
            where = f"between {lo} and {hi}" if lo is not None and hi is not None else "a finite number"
            raise ValueError(f"{node_cls.__name__}: {name} is {value}; set a number {where}.")
