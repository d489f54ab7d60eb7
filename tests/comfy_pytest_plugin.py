"""pytest plugin (loaded from pyproject's addopts). Three jobs:

* keep the checkout root out of test module names (below);
* say which ComfyUI (version, folder, venv) the run uses: a header line, shown under -q too, and a
  closing line (scripts/test.sh runs the suite under two ComfyUI versions);
* `--comfyui-only`: select the tests that use ComfyUI, and check in every run that no test uses
  ComfyUI without being selected (see "tests that use ComfyUI" below).

A ComfyUI custom-node pack must have an `__init__.py` at its root, so pytest would treat the whole
checkout as a package named after its folder and import the tests as `<folder>.tests.test_x`. When
that folder name is a valid identifier (a clone called `comfy`, `nodes`, `main`, ...) it shadows
ComfyUI's own modules of the same name. This makes package resolution stop below the root, so the
tests are always the top-level package `tests`, whatever the clone is called.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import os
import re
import sys
import textwrap
import types
from pathlib import Path

import _pytest.config
import _pytest.pathlib
import pytest

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


# ----------------------------------------------------------------------------- the ComfyUI in use
# scripts/test.sh runs the suite under two ComfyUI versions; every run says which one it used.

def _comfyui_lines() -> list[str]:
    from scripts.comfy_headless import default_comfyui_dir

    def describe(path: Path) -> str:
        try:
            text = (path / "comfyui_version.py").read_text()
            version = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text).group(1)
        except (OSError, AttributeError):
            return f"ComfyUI: none at {path}"
        return f"ComfyUI {version} at {path}"

    harness = default_comfyui_dir()
    source = "ZIMAGE_COMFYUI_DIR" if os.environ.get("ZIMAGE_COMFYUI_DIR") else "default"
    packages = []
    for name in ("torch", "comfyui-frontend-package"):
        try:
            packages.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            packages.append(f"{name} -")
    lines = [f"{describe(harness)} ({source}); {', '.join(packages)}; python {sys.prefix}"]
    from tests.comfyui_reference import locate_comfyui  # where the parity tests import ComfyUI from

    reference = locate_comfyui()
    if reference is not None and reference.resolve() != harness.resolve():
        lines.append(f"reference {describe(reference)} (tests/comfyui_reference.py)")
    return lines


def pytest_report_header(config: pytest.Config) -> list[str]:
    return _comfyui_lines()


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    # -q (scripts/test.sh) hides the report header; the ComfyUI version is still worth a line.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and session.config.get_verbosity() < 0:
        for line in _comfyui_lines():
            reporter.write_line(line)


# ----------------------------------------------------------------------------- tests that use ComfyUI
# `--comfyui-only` keeps the tests that use ComfyUI: tests/test_comfy_*.py, tests marked
# @pytest.mark.comfyui, and those whose code (the test, its fixtures and the tests/ helpers they call,
# read statically) reaches tests/comfyui_reference.py or the ComfyUI harness. scripts/test.sh runs them
# again under the second ComfyUI version. So that this reading cannot silently miss a test, every run
# counts the calls into ComfyUI per test (tests.comfyui_reference.uses) and fails when a test that made
# such a call was not selected.

MARKER = "comfyui"
_ENTRY_POINTS = {
    ("tests.comfyui_reference", "comfyui_dir"),
    ("tests.comfyui_reference", "require_comfyui"),
    ("tests.comfyui_reference", "import_comfy"),
    ("tests.comfy_harness", "comfy"),
    ("tests.comfy_harness", "require_comfyui"),
    ("tests.comfy_harness", "comfy_module"),
    ("scripts.comfy_headless", "HeadlessComfyUI"),
    ("scripts.comfy_headless", "default_comfyui_dir"),
}
_OWN_MODULES = ("tests.", "scripts.")
_reaching: set = set()  # functions and classes known to reach ComfyUI
_selected_key = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--comfyui-only", action="store_true",
                     help="run only the tests that use ComfyUI (scripts/test.sh's run under the second version)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: the test uses ComfyUI (also run under the second version)")


def _referenced(fn, tree) -> list:
    """The objects a function's code names: globals, attributes of global modules, local from-imports."""
    scope = getattr(fn, "__globals__", {})
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in scope:
            found.append(scope[node.id])
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            base = scope.get(node.value.id)
            if isinstance(base, types.ModuleType) and hasattr(base, node.attr):
                found.append(getattr(base, node.attr))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(_OWN_MODULES):
            try:
                module = importlib.import_module(node.module)
            except Exception:
                continue
            found += [getattr(module, alias.name) for alias in node.names if hasattr(module, alias.name)]
    return found


def _reaches_comfyui(obj, seen: set | None = None) -> bool:
    obj = inspect.unwrap(getattr(obj, "__func__", obj))
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        return False
    if obj in _reaching:
        return True
    seen = set() if seen is None else seen
    if obj in seen:
        return False
    seen.add(obj)
    module = getattr(obj, "__module__", "") or ""
    if (module, obj.__qualname__) in _ENTRY_POINTS:
        result = True
    elif not module.startswith(_OWN_MODULES):
        result = False
    elif inspect.isclass(obj):
        result = any(_reaches_comfyui(v, seen) for v in vars(obj).values())
    else:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
        except (OSError, TypeError, SyntaxError):
            result = False
        else:
            result = any(_reaches_comfyui(o, seen) for o in _referenced(obj, tree))
    if result:
        _reaching.add(obj)
    return result


def uses_comfyui(item: pytest.Item) -> bool:
    if item.path.name.startswith("test_comfy_") or item.get_closest_marker(MARKER):
        return True
    if _reaches_comfyui(getattr(item, "obj", None)):
        return True
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(info, "names_closure", ()):
        for fixturedef in info.name2fixturedefs.get(name, ()):
            if _reaches_comfyui(fixturedef.func):
                return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.stash[_selected_key] = uses_comfyui(item)
    if config.getoption("comfyui_only"):
        keep = [item for item in items if item.stash[_selected_key]]
        dropped = [item for item in items if not item.stash[_selected_key]]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep


_start_key = pytest.StashKey[int]()


def _uses() -> int:
    return getattr(sys.modules.get("tests.comfyui_reference"), "uses", 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    item.stash[_start_key] = _uses()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    # Judged once per test: after its call, or after a setup that did not pass (skip or error).
    if not (call.when == "call" or (call.when == "setup" and report.outcome != "passed")):
        return
    if item.stash.get(_selected_key, True) or report.outcome == "failed":
        return
    if _uses() > item.stash.get(_start_key, _uses()):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} uses ComfyUI (through tests/comfyui_reference.py or the harness), "
                           "but --comfyui-only does not select it, so scripts/test.sh would not run it under "
                           f"the second ComfyUI version: mark it @pytest.mark.{MARKER}")


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    for line in _comfyui_lines()[:1]:
        terminalreporter.write_line(f"this run: {line}")
