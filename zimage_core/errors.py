"""Errors a user can act on. Each message names the file or value, what was expected and the fix."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A file is not the checkpoint the loader expects (wrong model, truncated, not safetensors)."""

    def __init__(self, path: object, expected: str, found: str, fix: str = "") -> None:
        self.path = str(path)
        self.expected = expected
        self.found = found
        message = f"{self.path}: expected {expected}, but found {found}."
        if fix:
            message += f" {fix}"
        super().__init__(message)


class SamplingError(RuntimeError):
    """Sampling cannot produce a usable image (e.g. NaN/inf latents); says which step and what to do."""
