"""Checks on values that come from model files or API callers, shared by every loader.

A config value or a tensor shape from a file decides how much memory is allocated and how many
modules are built, so each one is checked against a generous bound for this architecture BEFORE
anything is built. `BoundsError` (a ValueError) names the value; `checkpoint_errors` turns it into a
`CheckpointError` naming the file, for loaders.
"""

from __future__ import annotations

import functools
import math
import re
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import torch

from .errors import CheckpointError

# Digits beyond this cannot be a layer index we accept; checked before int() so a key like
# "layers.<5000 digits>." never reaches Python's int-parsing limits.
_MAX_INDEX_DIGITS = 6

P = ParamSpec("P")
R = TypeVar("R")


class BoundsError(ValueError):
    """A value outside what the model can be: `name`, the bad `value` and what was `expected`."""

    def __init__(self, name: str, value: object, expected: str) -> None:
        self.name = name
        self.value = value
        self.expected = expected
        super().__init__(f"{name} must be {expected}, got {short_repr(value)}.")


def short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def whole_number(value: object, name: str, lo: int, hi: int, note: str = "") -> int:
    """`value` as an int in [lo, hi]; bools, fractions, strings and anything else are refused."""
    expected = f"a whole number between {lo} and {hi}{note}"
    if isinstance(value, bool):
        raise BoundsError(name, value, expected)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)  # JSON writers sometimes emit 30.0
    if not isinstance(value, int):
        try:
            value = int(value.__index__())  # numpy / torch integer scalars
        except (AttributeError, TypeError, ValueError):
            raise BoundsError(name, value, expected) from None
    if not lo <= value <= hi:
        raise BoundsError(name, value, expected)
    return value


def real_number(value: object, name: str, lo: float, hi: float, *, lo_open: bool = False,
                note: str = "") -> float:
    """`value` as a finite float in [lo, hi] (or (lo, hi] with lo_open)."""
    expected = f"a finite number {'>' if lo_open else '>='} {lo:g} and <= {hi:g}{note}"
    if isinstance(value, bool):
        raise BoundsError(name, value, expected)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise BoundsError(name, value, expected) from None
    if not (math.isfinite(number) and (number > lo if lo_open else number >= lo) and number <= hi):
        raise BoundsError(name, value, expected)
    return number


def whole_numbers(value: object, name: str, lo: int, hi: int, *, count: tuple[int, int],
                  note: str = "") -> tuple[int, ...]:
    """A list/tuple of `count[0]..count[1]` whole numbers, each in [lo, hi]."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise BoundsError(name, value, f"a list of {count[0]} to {count[1]} whole numbers{note}")
    if not count[0] <= len(value) <= count[1]:
        raise BoundsError(name, value, f"a list of {count[0]} to {count[1]} whole numbers{note}")
    return tuple(whole_number(v, f"{name}[{i}]", lo, hi, note) for i, v in enumerate(value))


def numbered_blocks(keys: Iterable[str], prefix: str, name: str, *, max_count: int) -> int:
    """How many blocks `{prefix}{i}.…` the keys hold; indices must run 0..n-1 without gaps, n <= max_count.

    Raises BoundsError naming the first offending key. Never builds anything proportional to an index.
    """
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found: dict[int, str] = {}
    for key in keys:
        m = pattern.match(key)
        if m is None:
            continue
        digits = m.group(1)
        index = int(digits) if len(digits) <= _MAX_INDEX_DIGITS else None
        if index is None or index >= max_count:
            raise BoundsError(name, key, f"numbered 0 to {max_count - 1} (a {name} index in that range)")
        found.setdefault(index, key)
    n = len(found)
    if n and max(found) != n - 1:
        gap = min(set(range(n)) - set(found))  # n <= max_count, so this set is small
        raise BoundsError(name, f"{prefix}{gap}.* missing (keys up to {found[max(found)]!r})",
                          "numbered from 0 without gaps")
    return n


def require_float(path: object, key: str, dtype: torch.dtype, what: str, fix: str = "") -> None:
    """Weights are floating point (fp8 included); integer or bool tensors are not a model's weights."""
    if not dtype.is_floating_point:
        raise CheckpointError(path, f"{what} with floating-point weights",
                              f"tensor {key} stored as {dtype}", fix)


def compute_dtype(dtype: object, name: str = "dtype", *, allow_fp8: bool = False) -> torch.dtype | None:
    """A `dtype=` argument: None or a floating torch dtype (fp8 only where the caller stores it)."""
    if dtype is None:
        return None
    allowed = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    if allow_fp8:
        allowed += (torch.float8_e4m3fn, torch.float8_e5m2)
    if not isinstance(dtype, torch.dtype) or dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{name} must be None or one of {names}, got {short_repr(dtype)}.")
    return dtype


@contextmanager
def checkpoint_errors(path: object, what: str, fix: str = "") -> Iterator[None]:
    """Report a BoundsError raised inside as a CheckpointError naming `path` and the bad value."""
    try:
        yield
    except BoundsError as e:
        raise CheckpointError(path, f"{what} ({e.name} {e.expected})",
                              f"{e.name} = {short_repr(e.value)}", fix) from None


def release_on_error(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: if `fn` raises (an interrupt included), free what its frames held.

    A traceback keeps every frame it passes through alive, and with them a half-loaded model or the
    tiles of a decode, for as long as anyone holds the exception (ComfyUI keeps it for its error
    report). Clearing the finished frames' locals frees that memory; the traceback text is unchanged.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            seen: set[int] = set()
            exc: BaseException | None = e
            while exc is not None and id(exc) not in seen and len(seen) < 16:
                seen.add(id(exc))
                traceback.clear_frames(exc.__traceback__)  # skips the frame still running (this one)
                exc = exc.__cause__ or exc.__context__
            raise

    return wrapper
