"""Where the real ComfyUI backend (the reference for parity tests) lives, and importing its code.

scripts/setup.sh installs ComfyUI 0.3.75 at <repo>/.comfyui/ComfyUI; ZIMAGE_COMFYUI_DIR overrides it.
Locally a missing install skips the ComfyUI comparisons with the reason; under CI (CI=true) it fails,
so a broken install can never turn the reference checks into silent skips.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from scripts.comfy_headless import default_comfyui_dir

ROOT = Path(__file__).resolve().parents[1]


def comfyui_dir() -> Path | None:
    candidates = [default_comfyui_dir()]  # $ZIMAGE_COMFYUI_DIR or <repo>/.comfyui/ComfyUI, as the harness
    git = ROOT / ".git"
    if git.is_file():  # a git worktree: the main checkout's install serves it too
        gitdir = Path(git.read_text().split("gitdir:", 1)[-1].strip())
        candidates.append(gitdir.parents[2] / ".comfyui" / "ComfyUI")
    for candidate in candidates:
        if (candidate / "comfy" / "model_management.py").is_file():
            return candidate
    return None


def require_comfyui() -> Path:
    """The ComfyUI directory; skip (fail under CI) when it is not installed."""
    found = comfyui_dir()
    if found is None:
        reason = "ComfyUI backend not installed: run scripts/setup.sh (or set ZIMAGE_COMFYUI_DIR)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def import_comfy(module: str) -> ModuleType:
    """Import a module of ComfyUI's `comfy` package on CPU-only torch (e.g. "comfy.ldm.lumina.model")."""
    root = str(require_comfyui())
    # Appended, not prepended: ComfyUI's top-level `nodes`/`tests` must not shadow this repo's.
    if root not in sys.path:
        sys.path.append(root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # CPU-only torch here; model_management would probe CUDA otherwise
    return importlib.import_module(module)
