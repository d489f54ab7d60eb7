"""Where the real ComfyUI backend (the reference for parity tests) lives, and importing its code.

scripts/setup.sh installs ComfyUI 0.3.75 at <repo>/.comfyui/ComfyUI; ZIMAGE_COMFYUI_DIR overrides it
(scripts/test.sh points it at .comfyui/ComfyUI-0.18.1 for its second run). Locally a missing install skips
the ComfyUI comparisons with the reason; under CI (CI=true) it fails, so a broken install can never turn the
reference checks into silent skips.

Every use is counted (`uses`): the pytest plugin checks that each test reaching ComfyUI this way is among
those scripts/test.sh runs again under the second ComfyUI version.
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
uses = 0  # calls into ComfyUI through this module (see the module docstring)


def note_use() -> None:
    global uses
    uses += 1


def comfyui_dir() -> Path | None:
    note_use()
    return locate_comfyui()


def locate_comfyui() -> Path | None:
    """comfyui_dir() without counting a use (for reports)."""
    candidates = [default_comfyui_dir()]  # $ZIMAGE_COMFYUI_DIR or <repo>/.comfyui/ComfyUI, as the harness
    git = ROOT / ".git"
    # A git worktree: the main checkout's install serves it too, unless a ComfyUI was named explicitly
    # (a run meant for another ComfyUI version must never quietly compare against this one).
    if git.is_file() and not os.environ.get("ZIMAGE_COMFYUI_DIR"):
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
