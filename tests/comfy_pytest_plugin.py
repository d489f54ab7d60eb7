"""pytest plugin (loaded from pyproject's addopts): keep the checkout root out of test module names.

A ComfyUI custom-node pack must have an `__init__.py` at its root, so pytest would treat the whole
checkout as a package named after its folder and import the tests as `<folder>.tests.test_x`. When
that folder name is a valid identifier (a clone called `comfy`, `nodes`, `main`, ...) it shadows
ComfyUI's own modules of the same name. This makes package resolution stop below the root, so the
tests are always the top-level package `tests`, whatever the clone is called.
"""

from __future__ import annotations

from pathlib import Path

import _pytest.config
import _pytest.pathlib

ROOT = Path(__file__).resolve().parents[1]
_original = _pytest.pathlib.resolve_package_path


def _resolve_package_path(path: Path) -> Path | None:
    result = _original(path)
    if result is None or Path(result).resolve() != ROOT:
        return result
    try:
        parts = Path(path).resolve().relative_to(ROOT).parts
    except ValueError:
        return result
    child = ROOT / parts[0] if parts else None
    if child is not None and child.is_dir() and (child / "__init__.py").is_file():
        return child
    return None


_pytest.pathlib.resolve_package_path = _resolve_package_path
_pytest.config.resolve_package_path = _resolve_package_path
