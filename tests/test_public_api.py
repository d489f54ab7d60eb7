"""The public contract of zimage_core that the nodes and outside users build on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import zimage_core

ROOT = Path(__file__).resolve().parents[1]


def test_every_exported_name_resolves():
    missing = [name for name in zimage_core.__all__ if getattr(zimage_core, name, None) is None]
    assert not missing


def test_contract_names_are_exported():
    for name in ("load_transformer", "ZImageTransformer", "flow_sigmas", "CheckpointError", "make_noise",
                 "sample_text_to_image", "sample_img2img", "load_text_encoder", "load_vae", "model_fingerprint"):
        assert name in zimage_core.__all__, name
    assert issubclass(zimage_core.CheckpointError, ValueError)


def test_core_never_imports_comfy():
    """zimage_core must run without ComfyUI: importing every module pulls in no `comfy` package."""
    modules = sorted(p.stem for p in (ROOT / "zimage_core").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('zimage_core.' + m)\n"
        "bad = sorted(m for m in sys.modules if m == 'comfy' or m.startswith('comfy.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
