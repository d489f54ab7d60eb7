"""The pack's web extension and the shipped workflows in ComfyUI's real frontend, in headless Chromium.

ComfyUI's main.py serves its bundled frontend with this pack and the demo models; Debian's `chromium`,
driven by puppeteer-core (both installed by scripts/setup_browser.sh, which scripts/test.sh runs: `.node/`),
does what a user does, in tests/frontend/browser_check.js: drop each shipped workflow onto the canvas (and
measure, at 100 % zoom, whether every widget's label and value and every note fit), point the loaders at the
demo files and shrink the image, press the Run (Queue) button, wait until the SaveImage node shows its
image. On the way it exercises web/zimage.js: choosing a preset writes width and height; a connected
negative prompt is labelled unused while guidance is 0 (and not at guidance > 0); a node that sends
text in its UI output (ZImagePromptEnhancer, where the pack has it) shows that text. Screenshots go to
test-artifacts/browser/<ComfyUI version>/ (gitignored; CI keeps them as artifacts).

Without the browser tools the test is skipped locally and fails under CI=true.

Time: about 2 minutes per ComfyUI version on the 2-core CI machine (server start, frontend load, nine
workflows), so scripts/test.sh runs them under the versions with the frontends current users have:
ComfyUI 0.28.0 (frontend 1.45) and 0.18.1 (1.42.8; its Run button and dialogs differ from 0.3.75's
1.32.9). Under 0.3.75 they are skipped unless ZIMAGE_BROWSER_ALL_VERSIONS=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from scripts.comfy_headless import default_comfyui_dir
from tests.comfy_harness import DEMO_LORA, SOURCE_IMAGE, WORKFLOWS, _write_source_image
from tests.comfy_server import running_server
from zimage_core.demo_weights import DEMO_FILES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "frontend" / "browser_check.js"
NODE_MODULES = ROOT / ".node" / "node_modules"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
SIZE = 32
TIMEOUT_S = 90  # per workflow
ENHANCER = "ZImagePromptEnhancer"
BROWSER_COMFYUI = ("0.18.1", "0.28.0")
DEMO_WIDGETS = {
    "ZImageModelLoader": {"model_name": DEMO_FILES["diffusion_models"]},
    "ZImageTextEncoderLoader": {"text_encoder_name": DEMO_FILES["text_encoders"]},
    "ZImageVAELoader": {"vae_name": DEMO_FILES["vae"]},
    "LoraLoaderModelOnly": {"lora_name": DEMO_LORA},
    "ZImageLoraLoader": {"lora_name": DEMO_LORA},
    "ZImageControlNetLoader": {"control_net_name": DEMO_FILES["model_patches"]},
    "LoadImage": {"image": SOURCE_IMAGE},
    # The demo language model writes gibberish until max_new_tokens: keep that short on the CPU.
    ENHANCER: {"max_new_tokens": 16},
}


def _browser_tools() -> tuple[dict[str, str], list[str]]:
    found, missing = {}, []
    node = shutil.which("node")
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium")
    for name, path in (("node", node), ("chromium", chromium)):
        (found.__setitem__(name, path) if path else missing.append(f"`{name}` (apt-get install {name})"))
    if not (NODE_MODULES / "puppeteer-core" / "package.json").is_file():
        missing.append(f"puppeteer-core in {NODE_MODULES} (scripts/setup_browser.sh installs it)")
    return found, missing


def _source_image_bytes(tmp: Path) -> bytes:
    path = tmp / SOURCE_IMAGE
    _write_source_image(path)
    return path.read_bytes()


def _comfyui_version() -> str:
    text = (default_comfyui_dir() / "comfyui_version.py").read_text()
    return re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text).group(1)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    version = _comfyui_version()
    if version not in BROWSER_COMFYUI and not os.environ.get("ZIMAGE_BROWSER_ALL_VERSIONS"):
        pytest.skip(f"browser tests run under ComfyUI {' and '.join(BROWSER_COMFYUI)} only (time budget); "
                    "ZIMAGE_BROWSER_ALL_VERSIONS=1 runs them here too")
    tools, missing = _browser_tools()
    if missing:
        message = "browser tests need " + ", ".join(missing) + "; run scripts/setup_browser.sh (scripts/test.sh does)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run them: a missing browser is a failure there
        pytest.skip(message)
    tmp = tmp_path_factory.mktemp("browser")
    with running_server("browser", {SOURCE_IMAGE: _source_image_bytes(tmp)}) as server:
        version = server.get("/system_stats")["system"]["comfyui_version"]
        artifacts = ARTIFACTS / version
        shutil.rmtree(artifacts, ignore_errors=True)
        config = {"url": server.base, "artifacts": str(artifacts), "demo": DEMO_WIDGETS, "width": SIZE,
                  "height": SIZE, "timeout_ms": TIMEOUT_S * 1000,
                  "workflows": [str(p) for p in sorted(WORKFLOWS.glob("*.json"))]}
        (tmp / "config.json").write_text(json.dumps(config))
        env = {**os.environ, "NODE_PATH": str(NODE_MODULES), "CHROMIUM": tools["chromium"]}
        run = subprocess.run([tools["node"], str(SCRIPT), str(tmp / "config.json"), str(tmp / "report.json")],
                             env=env, capture_output=True, text=True, timeout=TIMEOUT_S * 6 + 60)
        assert (tmp / "report.json").is_file(), f"browser_check.js failed:\n{run.stdout}\n{run.stderr}"
        result = json.loads((tmp / "report.json").read_text())
        result["server_log"] = server.log
        result["exit"] = (run.returncode, run.stderr[-3000:])
    (artifacts / "report.json").write_text(json.dumps({k: v for k, v in result.items() if k != "server_log"},
                                                      indent=1))
    return result


def _workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS.glob("*.json")))
def test_workflow_dropped_queued_and_its_image_shown(report, name):
    assert report["exit"][0] == 0, report["exit"][1]
    entry = report["workflows"][name]
    workflow = _workflow(name)
    assert entry["loaded_nodes"] == len(workflow["nodes"]), "the frontend dropped nodes on load"
    assert entry["toasts"] == [], f"the frontend warned: {entry['toasts']}"
    assert entry["button"] in ("Run", "Queue", "Queue Prompt")
    assert not entry["errors"], f"execution error: {json.dumps(entry['errors'])[:2000]}\n{report['server_log'][-3000:]}"
    assert not entry.get("timed_out"), "no image within the time limit:\n" + report["server_log"][-3000:]
    saves = [n for n in workflow["nodes"] if n["type"] == "SaveImage"]
    assert saves and len(entry["images"]) == len(saves)
    for save in entry["images"]:
        assert save["images"], f"SaveImage {save['node']} shows no image"
        for image in save["images"]:
            assert "/view?" in image["src"] and image["complete"]
            # Edits of the source picture keep its size; the rest render SIZE x SIZE.
            assert (image["width"], image["height"]) == (SIZE, SIZE) or "img2img" in name or "inpaint" in name
    assert Path(entry["screenshot"]).stat().st_size > 10_000


@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS.glob("*.json")))
def test_extension_preset_writes_width_and_height(report, name):
    entry = report["workflows"][name]
    latents = [n for n in _workflow(name)["nodes"] if n["type"] == "ZImageEmptyLatent"]
    assert len(entry["presets"]) == len(latents)
    for record in entry["presets"]:
        assert record["preset"].startswith("1152x896")
        assert (record["width"], record["height"]) == (1152, 896), record


@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS.glob("*.json")))
def test_extension_labels_the_negative_unused_while_guidance_is_zero(report, name):
    entry = report["workflows"][name]
    samplers = [n for n in _workflow(name)["nodes"] if n["type"] == "ZImageTurboSampler"]
    assert len(entry["negative"]) == len(samplers)
    for record in entry["negative"]:
        assert record["linked"], "the test could not link a prompt to the negative input"
        assert "unused" in record["guidance_0"] and "guidance" in record["guidance_0"], record
        assert record["guidance_1_5"] == "negative", record
        assert "unused" in record["guidance_0_again"], record
        if not record["was_linked"]:  # (a workflow's own negative, e.g. Base's, stays linked)
            assert record["unlinked"] == "negative", "an unconnected negative needs no label"
    if samplers:
        assert Path(entry["negative_screenshot"]).is_file()


@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS.glob("*.json")))
def test_widget_labels_values_titles_and_notes_fit_their_nodes(report, name):
    # What a newcomer sees on dropping the workflow, at 100 % zoom: no widget whose label or value the
    # frontend cuts short ("mo… z_image_turbo_bf16"), no cut title, no note whose text runs past its edge
    # (a table's "download" column). The frontend's own fit tests, measured in the page (browser_check.js).
    layout = report["workflows"][name]["layout"]
    nodes = _workflow(name)["nodes"]
    measured = {(w["node"], w["name"]) for w in layout["widgets"]}
    loaders = [n for n in nodes if n["type"].endswith("Loader")]
    assert loaders and all(any(node == n["id"] for node, _ in measured) for n in loaders), \
        "the loaders' widgets were not measured"
    cut = [f"{w['type']} #{w['node']}: '{w['label']}' + '{w['value']}' need {w['needed']} px, "
           f"{w['available']} px there" for w in layout["widgets"] if not w["fits"]]
    assert not cut, "cut-off widget text:\n" + "\n".join(cut)
    assert len(layout["titles"]) == len(nodes)
    cut = [f"{t['type']} #{t['node']}: '{t['title']}' needs {t['needed']} px, {t['available']} px there"
           for t in layout["titles"] if not t["fits"]]
    assert not cut, "cut-off node titles:\n" + "\n".join(cut)
    notes = [n for n in nodes if n["type"] in ("MarkdownNote", "Note")]
    assert len(layout["notes"]) == len(notes) and all(n["found"] for n in layout["notes"])
    wide = [n for n in layout["notes"] if n["overflow_px"] > 1]
    assert not wide, f"note text runs past the note's right edge: {wide}"


def test_extension_shows_the_prompt_enhancers_text(report):
    if ENHANCER not in report["node_types"]:
        pytest.skip(f"this version of the pack has no {ENHANCER} node")
    shown = [t for entry in report["workflows"].values() for t in entry["texts"].values() if t["type"] == ENHANCER]
    assert shown, f"no shipped workflow ran {ENHANCER}"
    for record in shown:
        sent = [s for s in record["sent"] if s.strip()]
        assert sent, "the enhancer sent no text"
        assert all(any(s in t for t in record["shown"]) for s in sent), record
